"""``mxdit serve``: SGLang's / OpenAI's ``/v1/videos`` API over one loaded pipeline."""
