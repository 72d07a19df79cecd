"""SGLang's command line and perf files, one for one (issue 15 items 1-2).

The flag lists below are SGLang v0.5.23's own: every option string its argparse parsers define, read
by building SGLang's parsers from the v0.5.23 wheel (``sglang-0.5.23-cp311``, PyPI):
``python/sglang/multimodal_gen/runtime/server_args/server_args.py`` (``ServerArgs.add_cli_args``, which
also adds the pipeline / DiT / VAE / Nunchaku / disagg / KV-quant groups),
``configs/sample/sampling_params.py`` (``SamplingParams.add_cli_args``) and
``runtime/entrypoints/cli/generate.py`` / ``serve.py`` (``--config``, ``--perf-dump-path``,
``--output-file-path``, ``--text-encoder-configs``).  Each entry: (the option strings of one action,
a plausible value; None for a switch).  ``--debug`` is left out: ``mxdit``'s own entry point takes it.
"""
from __future__ import annotations

import json

import pytest

from mxdit import cli
from mxdit.tools import generate, serve

#: options both parsers define (``ServerArgs.add_cli_args`` and the shared entry-point flags)
SGLANG_SHARED_FLAGS = [
    ('--config', 'x'),
    ('--model-path', 'x'),
    ('--model-subfolder', 'x'),
    ('--model-variant', 'x'),
    ('--minimax-h3-adaln-online', None),
    ('--minimax-h3-adaln-plan-width', '2'),
    ('--minimax-h3-adaln-host-cache-gb', '0.5'),
    ('--minimax-h3-adaln-cache-path', 'x'),
    ('--model-id', 'x'),
    ('--served-model-name', 'x'),
    ('--pipeline --pipeline-class-name', 'x'),
    ('--load-diffusion-decoder', None),
    ('--attention-backend', 'x'),
    ('--attention-backend-config', 'x'),
    ('--component-attention-backends', 'x'),
    ('--cache-dit-config', 'x'),
    ('--trust-remote-code', None),
    ('--revision', 'x'),
    ('--performance-mode --mode', 'manual'),
    ('--enable-nccl-nvls', None),
    ('--num-gpus', '2'),
    ('--base-gpu-id', '2'),
    ('--nnodes', '2'),
    ('--node-rank', '2'),
    ('--dist-init-addr', 'x'),
    ('--gpu-ids', 'x'),
    ('--numa-node', '2'),
    ('--tp-size', '2'),
    ('--sp-degree', '2'),
    ('--ulysses-degree', '2'),
    ('--ring-degree', '2'),
    ('--encoder-parallel', 'auto'),
    ('--kv-gather-degree', '2'),
    ('--enable-cfg-parallel', None),
    ('--cfg-parallel-size', '2'),
    ('--data-parallel-size --dp-size --dp', '2'),
    ('--hsdp-replicate-dim', '2'),
    ('--hsdp-shard-dim', '2'),
    ('--dist-timeout', '2'),
    ('--scheduler-rpc-timeout', '2'),
    ('--disagg-role', 'monolithic'),
    ('--disagg-timeout', '2'),
    ('--disagg-downstream-wait-timeout', '2'),
    ('--disagg-dispatch-policy', 'round_robin'),
    ('--disagg-instance-id', '2'),
    ('--disagg-max-slots-per-instance', '2'),
    ('--disagg-transfer-redundancy', '0.5'),
    ('--disagg-role-device', 'auto'),
    ('--disagg-transfer-backend', 'auto'),
    ('--disagg-transfer-pool-size', '2'),
    ('--disagg-transfer-pin-memory', 'auto'),
    ('--disagg-p2p-hostname', 'x'),
    ('--disagg-ib-device', 'x'),
    ('--disagg-server-addr', 'x'),
    ('--encoder-urls', 'x'),
    ('--prompt-encoder-urls', 'x'),
    ('--image-encoder-urls', 'x'),
    ('--denoiser-urls', 'x'),
    ('--decoder-urls', 'x'),
    ('--encoder-tp', '2'),
    ('--denoiser-tp', '2'),
    ('--denoiser-sp', '2'),
    ('--denoiser-ulysses', '2'),
    ('--denoiser-ring', '2'),
    ('--decoder-sp', '2'),
    ('--prompt-file-path', 'x'),
    ('--mask-strategy-file-path', 'x'),
    ('--enable-torch-compile', None),
    ('--regional-compile', None),
    ('--offload-during-compile', None),
    ('--allow-cudnn-tf32', None),
    ('--allow-bf16-reduced-precision-reduction', None),
    ('--enable-breakable-cuda-graph', None),
    ('--bcg-text-buckets', '2'),
    ('--enable-layerwise-nvtx-marker', None),
    ('--warmup-mode', 'off'),
    ('--warmup-resolutions', 'x'),
    ('--warmup-num-frames', '2'),
    ('--warmup-steps', '2'),
    ('--warmup-sampling-params', 'x'),
    ('--component-residency', 'x'),
    ('--dit-cpu-offload', None),
    ('--direct-gpu-weight-loading', None),
    ('--cpu-offload-components', 'x'),
    ('--dit-layerwise-offload', None),
    ('--layerwise-offload-components --layerwise-offload-modules', 'x'),
    ('--dit-offload-prefetch-size', '0.5'),
    ('--dit-layerwise-resident-layers', '0.5'),
    ('--layerwise-prefetch-size', 'x'),
    ('--layerwise-resident-layers', 'x'),
    ('--layerwise-residency-policy', 'x'),
    ('--layerwise-residency-lifetime', 'x'),
    ('--dit-layerwise-residency-policy', 'leading'),
    ('--dit-layerwise-residency-lifetime', 'forward'),
    ('--text-encoder-cpu-offload', None),
    ('--image-encoder-cpu-offload', None),
    ('--vae-cpu-offload', None),
    ('--use-fsdp-inference', None),
    ('--pin-cpu-memory', None),
    ('--ltx2-two-stage-device-mode', 'original'),
    ('--disable-autocast', None),
    ('--kv-cache-quant', 'off'),
    ('--kv-cache-quant-centroids', '2'),
    ('--kv-cache-quant-block-size', '2'),
    ('--kv-cache-quant-stages', '2'),
    ('--kv-cache-quant-iters', '2'),
    ('--kv-cache-quant-asymmetric', None),
    ('--kv-cache-quant-keep-recent', '2'),
    ('--kv-cache-quant-sink', '0'),
    ('--kv-cache-quant-sink-keep', '2'),
    ('--quantization', 'x'),
    ('--quantization-ignored-layers', 'x'),
    ('--enable-svdquant', None),
    ('--transformer-weights-path', 'x'),
    ('--quantization-precision', 'x'),
    ('--quantization-rank', '2'),
    ('--quantization-act-unsigned', None),
    ('--master-port', '2'),
    ('--scheduler-port', '2'),
    ('--batching-mode', 'dynamic'),
    ('--batching-max-size', '2'),
    ('--batching-delay-ms', '0.5'),
    ('--batching-config', 'x'),
    ('--enable-batching-metrics', None),
    ('--sleep-on-idle', None),
    ('--async-output-save', None),
    ('--host', 'x'),
    ('--port', '2'),
    ('--http-graceful-shutdown-timeout', '2'),
    ('--enable-metrics', None),
    ('--strict-ports', None),
    ('--webui', None),
    ('--webui-port', '2'),
    ('--output-path', 'x'),
    ('--input-save-path', 'x'),
    ('--lora-path', 'x'),
    ('--lora-nickname', 'x'),
    ('--lora-scale', '0.5'),
    ('--lora-alpha', '2'),
    ('--lora-merge-mode', 'auto'),
    ('--lora-weight-name', 'x'),
    ('--pipeline-config-path', 'x'),
    ('--embedded-cfg-scale', '0.5'),
    ('--flow-shift', '0.5'),
    ('--scheduler-class-override', 'x'),
    ('--resolution', '2'),
    ('--streaming', None),
    ('--refiner-chunked', None),
    ('--num-frame-per-block', '2'),
    ('--dit-precision', 'fp32'),
    ('--vae-precision', 'fp32'),
    ('--vae-decode-precision', 'fp32'),
    ('--vae-tiling', None),
    ('--diffusion-decoder-tiling', None),
    ('--diffusion-decoder-parallel-tiling', None),
    ('--vae-slicing', None),
    ('--vae-sp', None),
    ('--text-encoder-precisions', 'fp32'),
    ('--image-encoder-precision', 'fp32'),
    ('--dmd-denoising-steps', '1,2'),
    ('--realtime-causal-sink-size', '2'),
    ('--realtime-causal-kv-cache-num-frames', '2'),
    ('--vae-config.load-encoder', None),
    ('--vae-config.load-decoder', None),
    ('--vae-config.tile-sample-min-height', '2'),
    ('--vae-config.tile-sample-min-width', '2'),
    ('--vae-config.tile-sample-min-num-frames', '2'),
    ('--vae-config.tile-sample-stride-height', '2'),
    ('--vae-config.tile-sample-stride-width', '2'),
    ('--vae-config.tile-sample-stride-num-frames', '2'),
    ('--vae-config.blend-num-frames', '2'),
    ('--vae-config.use-tiling', None),
    ('--vae-config.use-temporal-tiling', None),
    ('--vae-config.use-parallel-tiling', None),
    ('--vae-config.use-parallel-decode', None),
    ('--vae-config.parallel-decode-mode', 'tiled'),
    ('--dit-config.prefix', 'x'),
    ('--dit-config.quant-config', 'x'),
    ('--dit-config.torch-compile-mode', 'x'),
    ('--log-level', 'x'),
    ('--enable-trace', None),
    ('--otlp-traces-endpoint', 'x'),
    ('--otlp-service-name', 'x'),
    ('--log-requests', None),
    ('--log-requests-level', '0'),
    ('--log-requests-format', 'text'),
    ('--log-requests-target', 'x'),
    ('--uvicorn-access-log-exclude-prefixes', 'x'),
    ('--enable-cache-report', None),
    ('--disable-conditioning-cache', None),
    ('--conditioning-cache-max-size-mb', '0.5'),
    ('--backend', 'auto'),
    ('--srt-encoder-url', 'x'),
    ('--srt-encoder-connection-timeout', '2'),
    ('--srt-encoder-timeout', '2'),
    ('--pe-server-url', 'x'),
    ('--prompt-enhancer-config', 'x'),
]
#: ``sglang generate``: the shared options plus the sampling parameters and generate's own
SGLANG_GENERATE_FLAGS = SGLANG_SHARED_FLAGS + [
    ('--perf-dump-path', 'x'),
    ('--output-file-path', 'x'),
    ('--data-type', 'x'),
    ('--task-type', 'x'),
    ('--use-diffusion-decoder', None),
    ('--auto-duration', None),
    ('--auto-duration-min-seconds', '0.5'),
    ('--auto-duration-max-seconds', '0.5'),
    ('--num-frames-round-down', None),
    ('--enable-teacache', None),
    ('--enable-cache-dit', None),
    ('--cache-dit-params', '{}'),
    ('--cfg-gate-step', '0.5'),
    ('--attention-backend-override', 'x'),
    ('--enable-spectrum', None),
    ('--w', '0.5'),
    ('--taylor-order --taylor_order', '2'),
    ('--history-size --history_size', '2'),
    ('--spectrum-window-size --spectrum_window_size --window-size --window_size', '0.5'),
    ('--spectrum-flex-window --spectrum_flex_window --flex-window --flex_window', '0.5'),
    ('--spectrum-warmup-steps --spectrum_warmup_steps', '2'),
    ('--spectrum-m --spectrum_m', '2'),
    ('--spectrum-lam --spectrum_lam', '0.5'),
    ('--spectrum-tau-num-steps --spectrum_tau_num_steps', '2'),
    ('--enable-cfg-renorm', None),
    ('--cfg-renorm-min', '0.5'),
    ('--enable-prompt-rewrite', None),
    ('--profile', None),
    ('--num-profiled-timesteps', '2'),
    ('--profile-all-stages', None),
    ('--progressive-mode', 'fullres'),
    ('--progressive-levels', '2'),
    ('--progressive-delta', '0.5'),
    ('--prompt', 'x'),
    ('--negative-prompt', 'x'),
    ('--prompt-path', 'x'),
    ('--output-file-name', 'x'),
    ('--output-quality', 'maximum'),
    ('--output-compression', '2'),
    ('--x264-preset', 'ultrafast'),
    ('--quality', 'exact'),
    ('--num-outputs-per-prompt --num-outputs', '2'),
    ('--seed', '2'),
    ('--generator-device', 'cuda'),
    ('--num-frames', '2'),
    ('--sound-duration', '0.5'),
    ('--height', '2'),
    ('--width', '2'),
    ('--4k', None),
    ('--2k', None),
    ('--1080p', None),
    ('--720p', None),
    ('--fps', '2'),
    ('--num-inference-steps', '2'),
    ('--guidance-scale', '0.5'),
    ('--guidance-scale-2', '0.5'),
    ('--true-cfg-scale', '0.5'),
    ('--guidance-rescale', '0.5'),
    ('--cfg-normalization', '0.5'),
    ('--boundary-ratio', '0.5'),
    ('--save-output', None),
    ('--no-save-output', None),
    ('--return-frames', None),
    ('--image-path --image-paths', 'x'),
    ('--action', 'x'),
    ('--translation-speed --translation_speed', '0.5'),
    ('--rotation-speed-deg --rotation_speed_deg', '0.5'),
    ('--pitch-limit-deg --pitch_limit_deg', '0.5'),
    ('--video-path', 'x'),
    ('--sr-resolution-scale', '0.5'),
    ('--sr-num-steps', '2'),
    ('--sr-tiles-batch-size', '2'),
    ('--sr-tile-min-overlap', '0.5'),
    ('--sr-target-resolution', 'x'),
    ('--sr-target-resize-mode', 'fit'),
    ('--action-mode', 'x'),
    ('--domain-id', '2'),
    ('--domain-name', 'x'),
    ('--raw-action-dim', '2'),
    ('--action-fps', '0.5'),
    ('--moba-config-path', 'x'),
    ('--return-trajectory-latents', None),
    ('--rollout', None),
    ('--rollout-sde-type', 'sde'),
    ('--rollout-noise-level', '0.5'),
    ('--rollout-log-prob-no-const', None),
    ('--rollout-debug-mode', None),
    ('--return-trajectory-decoded', None),
    ('--diffusers-kwargs', 'x'),
    ('--no-override-protected-fields', None),
    ('--adjust-frames', None),
    ('--return-file-paths-only', None),
    ('--enable-sequence-shard', None),
    ('--enable-frame-interpolation', None),
    ('--frame-interpolation-exp', '2'),
    ('--frame-interpolation-scale', '0.5'),
    ('--frame-interpolation-model-path', 'x'),
    ('--enable-upscaling', None),
    ('--upscaling-model-path', 'x'),
    ('--upscaling-scale', '2'),
    ('--bot-task', 'x'),
    ('--system-prompt', 'x'),
    ('--text-encoder-configs', 'x'),
]
#: ``sglang serve``: the shared options plus serve's own
SGLANG_SERVE_FLAGS = SGLANG_SHARED_FLAGS + [
]

#: what mxdit must accept (not refuse) of SGLang's flags: the ones issue 15 names, and the shared core
MUST_ACCEPT = {
    "--config", "--perf-dump-path", "--output-file-path", "--model-path", "--quantization",
    "--quantization-ignored-layers", "--transformer-weights-path", "--output-path", "--output-file-name",
    "--save-output", "--no-save-output", "--dit-precision", "--vae-precision", "--vae-decode-precision",
    "--text-encoder-precisions", "--image-encoder-precision", "--prompt", "--prompt-file-path", "--prompt-path",
    "--seed", "--image-path", "--image-paths", "--num-outputs-per-prompt", "--num-outputs", "--negative-prompt",
    "--height", "--width", "--num-frames", "--fps", "--num-inference-steps", "--guidance-scale",
    "--guidance-scale-2", "--boundary-ratio", "--flow-shift", "--attention-backend", "--num-gpus", "--tp-size",
    "--sp-degree", "--ulysses-degree", "--ring-degree", "--enable-cfg-parallel", "--cfg-parallel-size",
    "--master-port", "--dist-timeout", "--warmup-mode", "--warmup-steps",
}
MUST_ACCEPT_SERVE = {"--config", "--model-path", "--quantization", "--quantization-ignored-layers",
                     "--dit-precision", "--vae-precision", "--text-encoder-precisions", "--host", "--port",
                     "--output-path", "--served-model-name", "--num-gpus", "--ulysses-degree", "--attention-backend"}
#: mxdit's own flags and the aliases its README documents
MXDIT_OWN = [("--device", "cpu"), ("--no-progress", None), ("--dtype", "fp32"), ("--output", "x.mp4"),
             ("--image", "x.png"), ("--warmup", None)]


def _parse(tool, argv, capsys):
    """(namespace or None, stderr) of ``mxdit <tool>``'s own parser on ``argv``."""
    p = cli.ArgumentParser(prog=f"mxdit {tool.__name__.rsplit('.', 1)[-1]}")
    tool.add_arguments(p)
    capsys.readouterr()
    try:
        return p.parse_args(argv), capsys.readouterr().err
    except SystemExit as e:
        assert e.code == 2
        return None, capsys.readouterr().err


def _check_flags(tool, flags, must_accept, base, capsys, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    accepted, refused = set(), {}
    for opts, value in flags:
        for flag in opts.split():
            val = str(cfg) if flag == "--config" else value
            args, err = _parse(tool, [*base, flag, *([] if val is None else [val])], capsys)
            if args is not None:
                accepted.add(flag)
                continue
            assert err.count("\n") == 1, (flag, err)  # one line
            assert f"argument {flag}: not supported: " in err, (flag, err)  # with a reason, never argparse's
            assert "unrecognized arguments" not in err and "ambiguous" not in err, (flag, err)
            refused[flag] = err
    assert must_accept <= accepted, sorted(must_accept - accepted)
    return accepted, refused


def test_every_sglang_generate_flag_is_accepted_or_refused_with_a_reason(capsys, tmp_path):
    accepted, refused = _check_flags(generate, SGLANG_GENERATE_FLAGS, MUST_ACCEPT,
                                     ["--model-path", "m", "--prompt", "p"], capsys, tmp_path)
    assert len(accepted) + len(refused) == sum(len(o.split()) for o, _ in SGLANG_GENERATE_FLAGS)
    assert {"--lora-path", "--lora-nickname", "--lora-scale", "--lora-merge-mode"} <= accepted
    assert "LoRA" in refused["--lora-weight-name"] and "disaggregated" in refused["--disagg-role"]
    for flag, value in MXDIT_OWN:
        args, err = _parse(generate, ["--model-path", "m", "--prompt", "p", flag, *([] if value is None else [value])],
                           capsys)
        assert args is not None, (flag, err)


def test_every_sglang_serve_flag_is_accepted_or_refused_with_a_reason(capsys, tmp_path):
    accepted, refused = _check_flags(serve, SGLANG_SERVE_FLAGS, MUST_ACCEPT_SERVE, ["--model-path", "m"],
                                     capsys, tmp_path)
    assert "--prompt-file-path" in refused and "--warmup-mode" in refused
    args, _ = _parse(serve, ["--model-path", "m", "--device", "cpu", "--dtype", "fp32"], capsys)
    assert args is not None and args.dit_precision == "fp32"


def test_defaults_are_sglangs(capsys):
    from mxdit.tools.sglang_args import resolve_precisions

    args, _ = _parse(generate, ["--model-path", "m", "--prompt", "p"], capsys)
    assert args.output_path == "outputs/" and args.save_output is True and args.seed == [42]
    assert args.num_outputs_per_prompt == 1 and args.output_file_name is None
    import torch

    dt = resolve_precisions(args, ValueError)  # Wan2.2 in SGLang: DiT bf16, VAE fp32, T5 fp32
    assert dt == {"dtype": torch.bfloat16, "vae_dtype": torch.float32, "text_encoder_dtype": torch.float32}
    args, _ = _parse(serve, ["--model-path", "m"], capsys)
    assert (args.host, args.port, args.output_path, args.dit_precision) == ("127.0.0.1", 30000, "outputs/", "bf16")


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_config_file_keys_are_sglangs_and_flags_win(fmt, tmp_path, capsys):
    import yaml

    data = {"model_path": "m", "prompt": "a fox", "num_frames": 9, "quantization": "mxfp8", "seed": [1, 2],
            "save_output": False, "text_encoder_precisions": ["bf16"], "quantization_ignored_layers": "blocks.0.*",
            "guidance_scale": 3}
    cfg = tmp_path / f"c.{fmt}"
    cfg.write_text(json.dumps(data) if fmt == "json" else yaml.safe_dump(data))
    args, err = _parse(generate, ["--num-frames", "5", "--config", str(cfg), "--quantization", "mxfp4"], capsys)
    assert args is not None, err
    assert (args.model_path, args.prompt, args.num_frames, args.quantization) == ("m", ["a fox"], 5, "mxfp4")
    assert args.seed == [1, 2] and args.save_output is False and args.text_encoder_precisions == ["bf16"]
    assert args.quantization_ignored_layers == ["blocks.0.*"] and args.guidance_scale == 3.0
    for bad, needle in [({"num_frame": 9}, "key 'num_frame': unknown option"),
                        ({"lora_weight_name": "x"}, "key 'lora_weight_name': not supported: this LoRA option"),
                        ({"num_frames": "nine"}, "key 'num_frames'"), ({"save_output": "no"}, "expected true or false"),
                        ({"dit_precision": "int8"}, "unknown precision")]:
        cfg.write_text(json.dumps(bad) if fmt == "json" else yaml.safe_dump(bad))
        args, err = _parse(generate, ["--config", str(cfg)], capsys)
        assert args is None and err.count("\n") == 1 and needle in err, (bad, err)


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A tiny Wan2.2-T2V-A14B-shaped directory written by diffusers' own WanPipeline.save_pretrained, whose
    FFN width (768) is not a multiple of 512: dual-level MXFP4 cannot take ffn.net.2 (K = 768)."""
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    from mxdit.pipelines.tiny import _tiny_text_encoder, _tiny_vae, build_tiny_tokenizer

    def dit(seed):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=128, in_channels=16, out_channels=16,
            text_dim=512, freq_dim=256, ffn_dim=768, num_layers=1, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

    tok = build_tiny_tokenizer()
    pipe = WanPipeline(tokenizer=tok, text_encoder=_tiny_text_encoder(len(tok)), vae=_tiny_vae("wan2.1"),
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=3.0),
                       transformer=dit(1), transformer_2=dit(2), boundary_ratio=0.875)
    path = tmp_path_factory.mktemp("sglang-cli") / "Wan2.2-T2V-A14B-Diffusers"
    pipe.save_pretrained(str(path))
    return path


#: SGLang commands from its docs and PRs (docs/.../quantization.md, PR #20922 / #22338 benchmark scripts),
#: flags unchanged; the model path and, for a CPU test, the sizes are ours ({M}; small sizes via --config)
SGLANG_COMMANDS = [
    'generate --model-path {M} --quantization mxfp8 --prompt "A curious raccoon" --save-output --config {C}',
    'generate --model-path {M} --prompt "Two anthropomorphic cats" --height 32 --width 32 --num-gpus 1 '
    '--num-frames 5 --num-inference-steps 2 --warmup --perf-dump-path {P}',
]


def test_sglang_commands_run_unchanged(wan_dir, tmp_path, monkeypatch, capsys):
    import shlex

    import imageio.v3 as iio
    import yaml

    from mxdit.pipelines.timing import SGLANG_STAGE_NAMES
    from mxdit.tools.compare_perf import compare_files

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump({"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}))
    perf = tmp_path / "mxdit.json"
    for cmd in SGLANG_COMMANDS:
        argv = shlex.split(cmd.format(M=wan_dir, C=cfg, P=perf)) + ["--no-progress"]
        assert cli.main(argv) == 0, capsys.readouterr().err
    videos = sorted((tmp_path / "outputs").iterdir())  # SGLang's default folder and file names
    assert len(videos) == 2 and all(v.suffix == ".mp4" for v in videos)
    assert any(v.name.startswith("A_curious_raccoon_") for v in videos)
    assert any(v.name.startswith("Two_anthropomorphic_cats_") for v in videos)
    assert iio.imread(videos[0], index=None).shape == (5, 32, 32, 3)

    # the perf file: SGLang's exact keys first, mxdit's extras beside them
    rec = json.loads(perf.read_text())
    assert list(rec)[:len(SGLANG_PERF_KEYS)] == SGLANG_PERF_KEYS
    assert [s["name"] for s in rec["steps"]] == [SGLANG_STAGE_NAMES[s] for s in (
        "input_validation", "text_encoding", "latent_preparation", "timestep_preparation", "denoising", "decoding")]
    assert [s["step"] for s in rec["denoise_steps_ms"]] == [0, 1]
    assert {s["expert"] for s in rec["denoise_steps_ms"]} == {"transformer", "transformer_2"}
    assert all(set(v) == SGLANG_MEMORY_KEYS for v in rec["memory_checkpoints"].values())
    assert set(rec["meta"]) == {"prompt", "model"} and rec["warmup"] is True
    assert {"quantization", "device", "peak_memory"} <= set(rec)

    # an SGLang perf file with SGLang's exact key set and this mxdit file: one report, row for row
    sg = tmp_path / "sglang.json"
    sg.write_text(json.dumps(_sglang_perf(rec)))
    report = compare_files([sg, perf], now="NOW")
    rows = [ln for ln in report.splitlines() if ln.startswith("| ") and ln.split(" | ")[0].endswith("Stage")]
    assert [r.split(" | ")[0][2:] for r in rows] == [s["name"] for s in rec["steps"]]
    assert all("n/a" not in r for r in rows), rows
    assert "| Denoising Loop (2 steps) |" in report and "n/a | -" not in report.split("#### 2.")[1]


#: ``PerformanceLogger.dump_benchmark_report`` (v0.5.23 runtime/utils/perf_logger.py): the keys, in order
SGLANG_PERF_KEYS = ["timestamp", "request_id", "commit_hash", "tag", "total_duration_ms", "steps",
                    "denoise_steps_ms", "memory_checkpoints", "meta"]
#: ``MemorySnapshot.to_dict()``
SGLANG_MEMORY_KEYS = {"allocated_mb", "reserved_mb", "peak_allocated_mb", "peak_reserved_mb", "peak_host_anon_mb"}


def _sglang_perf(like: dict) -> dict:
    """What ``sglang generate --perf-dump-path`` writes for the same stages (twice as slow)."""
    snap = dict.fromkeys(sorted(SGLANG_MEMORY_KEYS), 0.0)
    out = {
        "timestamp": "2026-12-01T00:00:00+00:00", "request_id": "mocked_fake_id_for_offline_generate",
        "commit_hash": "4c9f31b85", "tag": "cli_generate", "total_duration_ms": 2 * like["total_duration_ms"],
        "steps": [{"name": s["name"], "duration_ms": 2 * s["duration_ms"]} for s in like["steps"]],
        "denoise_steps_ms": [{"step": s["step"], "duration_ms": 2 * s["duration_ms"]} for s in like["denoise_steps_ms"]],
        "memory_checkpoints": {"mem_analysis": snap}, "meta": {"prompt": "Two anthropomorphic cats", "model": "M"},
    }
    assert list(out) == SGLANG_PERF_KEYS
    return out


def test_quantization_ignored_layers_lets_mxfp4_dual_run_when_k_is_not_a_multiple_of_512(wan_dir, tmp_path, capsys):
    base = ["generate", "--model-path", str(wan_dir), "--quantization", "mxfp4_npu", "--height", "32", "--width", "32",
            "--num-frames", "5", "--num-inference-steps", "2", "--no-progress", "--output-path", str(tmp_path / "o")]
    capsys.readouterr()
    assert cli.main([*base, "--prompt", "a fox"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "ffn.net.2" in err and "--quantization-ignored-layers" in err, err  # + "loading"
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())
    # a batch: two prompts, one video each, SGLang's names (prompt, timestamp, hash)
    assert cli.main([*base, "--prompt", "a fox", "a bird", "--quantization-ignored-layers", "blocks.*.ffn.net.2"]) == 0, \
        capsys.readouterr().err
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert len(names) == 2 and names[0].startswith("a_bird_") and names[1].startswith("a_fox_"), names
