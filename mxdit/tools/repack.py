"""``mxdit repack``: an msmodelslim export + the diffusers model directory -> a
diffusers-layout model directory that ``mxdit generate`` reads as it is.

SGLang's ``wan_repack`` (../shared/reference/sglang-diffusion-mx.md §8), without
its traps: names go through the loader's one mapping (msmodelslim wrappers
``.linear.``/``.div.`` stripped as whole components, original Wan -> diffusers
names by exact table), shards are merged by a streaming writer (one tensor in
memory at a time), inputs are never modified, the output is built in a
temporary directory and renamed at the end, an existing output is refused
unless ``--overwrite``, and every input tensor is checked to appear in the
output exactly once.

Layout: ``high_noise_model`` -> ``transformer`` and ``low_noise_model`` ->
``transformer_2`` for the A14B models; TI2V-5B's export is the quant path itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

from mxdit.loader.checkpoint import model_name, model_name_map
from mxdit.loader.safetensors_io import CheckpointFiles, SafetensorsFile, write_safetensors
from mxdit.models.wan.config import MODEL_FACTS
from mxdit.models.wan.names import is_original_layout
from mxdit.quant.modelslim import (
    HEADER_KEYS, find_description_file, find_weight_files, is_description_only, load_description, strip_modelslim_wrappers,
)
from mxdit.fsutil import MARKER, OutputError, atomic_output_dir, check_output_vs_inputs, written_by_mxdit

MODEL_TYPES = ("Wan2.2-T2V-A14B", "Wan2.2-I2V-A14B", "Wan2.2-TI2V-5B")
EXPERT_SUBDIRS = {"transformer": "high_noise_model", "transformer_2": "low_noise_model"}


def transformer_dirs(model_type: str) -> list[str]:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {list(MODEL_TYPES)}")
    return ["transformer", "transformer_2"] if MODEL_FACTS[model_type].two_experts else ["transformer"]


def quant_subpath(quant_path: str, tdir: str, model_type: str) -> str:
    return os.path.join(quant_path, EXPERT_SUBDIRS[tdir]) if len(transformer_dirs(model_type)) == 2 else quant_path


class _Plan:
    """One transformer directory's repack, validated from headers before anything is written."""

    def __init__(self, src: str, orig_tdir: str):
        self.src, self.orig_tdir = src, orig_tdir
        self.desc_path = find_description_file(src)
        desc = load_description(self.desc_path)
        self.files = CheckpointFiles(find_weight_files(src))
        try:
            keys = self.files.keys()
            original = is_original_layout(strip_modelslim_wrappers(k) for k in keys)
            self.renamed = model_name_map(keys, original, src)
            self.n_inputs = len(keys)
            self.desc: dict = {}
            for k, v in desc.items():
                if k in HEADER_KEYS or not isinstance(v, str):
                    self.desc[k] = v
                else:
                    self.desc[model_name(k, original)] = v
            missing = sorted(n for n in self.renamed if n not in self.desc)
            if missing:
                raise ValueError(f"'{self.desc_path}' has no label for tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            self._check_like_the_loader(desc)
            ghosts = sorted(k for k, v in desc.items() if isinstance(v, str) and k not in HEADER_KEYS
                            and not is_description_only(k) and model_name(k, original) not in self.renamed)
            if ghosts:
                raise ValueError(
                    f"'{self.desc_path}' names tensors that are not in the weight files: {ghosts[:10]}{' ...' if len(ghosts) > 10 else ''}"
                )
        except BaseException:
            self.files.close()
            raise

    def _check_like_the_loader(self, desc: dict) -> None:
        """What the loader will check on the repacked directory, checked on the export now
        (the loader's own step 1: labels dispatched to methods, names, shapes, dtypes)."""
        from mxdit.loader.checkpoint import config_from_json, open_checkpoint
        from mxdit.loader.load import check_checkpoint

        ckpt = open_checkpoint(self.src, config=config_from_json(os.path.join(self.orig_tdir, "config.json")))
        try:
            check_checkpoint(ckpt)
        except NotImplementedError as e:  # an unknown label: bad input here
            raise ValueError(str(e)) from None
        finally:
            ckpt.files.close()

    def write(self, out_tdir: str) -> int:
        os.makedirs(out_tdir)
        out_file = os.path.join(out_tdir, "diffusion_pytorch_model.safetensors")
        files = self.files
        try:
            entries = [
                (new, files.info(old).dtype, files.info(old).shape, (lambda old=old: files.read(old, finite=True)))
                for new, old in sorted(self.renamed.items())
            ]
            write_safetensors(out_file, entries, metadata={"format": "pt", "source": "mxdit repack"})
        finally:
            files.close()
        with open(os.path.join(out_tdir, "quant_model_description.json"), "w") as f:
            json.dump(self.desc, f, indent=2)
        shutil.copy2(os.path.join(self.orig_tdir, "config.json"), os.path.join(out_tdir, "config.json"))
        # every input tensor exactly once in the output
        written = SafetensorsFile(out_file).keys()
        if sorted(written) != sorted(self.renamed) or len(written) != self.n_inputs:
            raise RuntimeError(f"repack of '{self.src}': the output does not hold every input tensor exactly once")
        return self.n_inputs


def repack(model_type: str, original_model_path: str, quant_path: str, output_path: str, *, overwrite: bool = False) -> dict[str, int]:
    """Build the repacked model directory; returns tensors written per transformer dir."""
    tdirs = transformer_dirs(model_type)
    for p, what in ((original_model_path, "--original-model-path"), (quant_path, "--quant-path")):
        if not os.path.isdir(p):
            raise FileNotFoundError(f"{what} '{p}' is not a directory")
    for t in tdirs:
        if not os.path.isfile(os.path.join(original_model_path, t, "config.json")):
            raise FileNotFoundError(f"'{original_model_path}' has no {t}/config.json (a diffusers {model_type} directory is expected)")
        find_description_file(quant_subpath(quant_path, t, model_type))
    inputs = {"--original-model-path": original_model_path, "--quant-path": quant_path}
    check_output_vs_inputs(output_path, inputs, "--output-path")
    if os.path.lexists(output_path) and not overwrite:
        raise FileExistsError(f"output '{os.path.abspath(output_path)}' already exists; pass --overwrite to replace it")
    if os.path.lexists(output_path) and not written_by_mxdit(output_path):
        raise OutputError(f"output '{os.path.abspath(output_path)}' was not written by mxdit; refusing to replace it with --overwrite")
    plans: dict[str, _Plan] = {}
    try:
        for t in tdirs:  # validate every export before copying anything (the text encoder alone is ~11 GB)
            plans[t] = _Plan(quant_subpath(quant_path, t, model_type), os.path.join(original_model_path, t))
        counts: dict[str, int] = {}
        with atomic_output_dir(output_path, overwrite=overwrite, tool="mxdit repack", inputs=inputs) as tmp:
            for entry in sorted(os.listdir(original_model_path)):
                if entry in tdirs or entry == MARKER:
                    continue
                src = os.path.join(original_model_path, entry)
                dst = os.path.join(tmp, entry)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
            for t in tdirs:
                counts[t] = plans[t].write(os.path.join(tmp, t))
        return counts
    finally:
        for pl in plans.values():
            pl.files.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-type", required=True, help=f"one of {', '.join(MODEL_TYPES)}")
    parser.add_argument("--original-model-path", required=True, help="the BF16 diffusers model directory")
    parser.add_argument("--quant-path", required=True, help="the msmodelslim export (high_noise_model/ and low_noise_model/ for A14B)")
    parser.add_argument("--output-path", required=True, help="where the repacked diffusers-layout directory is written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from mxdit.errors import UsageError

    try:
        counts = repack(args.model_type, args.original_model_path, args.quant_path, args.output_path, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        from mxdit.cli import one_line_error

        raise UsageError(one_line_error(e)) from None
    for t, n in counts.items():
        print(f"{t}: {n} tensors")
    print(f"wrote {args.output_path}")
    return 0
