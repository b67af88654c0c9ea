"""Record the op graphs the analytic tier replays, for every catalog model (or --model KEY...).

    python scripts/record_traces.py                 # all models, writes vramplan/models/traces/
    python scripts/record_traces.py --model sd15    # one model
    python scripts/record_traces.py --check --model sd15 --only unet.amp-frozen.sdpa

Each graph is the real diffusers/transformers forward on fake tensors with symbolic sizes
(vramplan/simulate/record.py). `--check` records again in memory and exits 1 if anything differs
from the shipped file (the `meta` block, which holds timings, is ignored).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vramplan.models.catalog import MODELS, ModelInfo  # noqa: E402

TRACES = ROOT / "vramplan" / "models" / "traces"
# "-keep-<targets>": the targeted layers return their input's dtype, as LoHa/LoKr layers do under
# mixed precision (see record_model.keep_dtype).
DENOISER_VARIANTS = ("fp32", "amp-frozen", "amp-trainable", "pure", "amp-frozen-keep-attn",
                     "amp-frozen-keep-attn-mlp", "amp-frozen-keep-all-linear", "amp-frozen-keep-all-linear+conv",
                     "amp-frozen-int8", "amp-frozen-nf4", "pure-int8", "pure-nf4")
TEXT_VARIANTS = ("fp32", "amp-frozen", "amp-trainable", "pure", "fp32-ti", "amp-frozen-ti", "pure-ti",
                 "amp-frozen-keep-te")
VAE_VARIANTS = ("fp32", "pure")
ATTENTION = ("sdpa", "eager")


def denoiser_bf16_variants() -> tuple:
    """The 16-bit denoiser variants recorded in bf16 too (`ModelInfo.bf16_traces`)."""
    return tuple(f"{v}-bf16" for v in DENOISER_VARIANTS if v != "fp32")


def jobs(model: ModelInfo):
    """(graph name, function recording it) for every graph of `model`."""
    from vramplan.simulate import record_model as rm

    for attention in ATTENTION:
        for variant in DENOISER_VARIANTS + (denoiser_bf16_variants() if model.bf16_traces else ()):
            yield (f"{model.denoiser.name}.{variant}.{attention}",
                   lambda v=variant, a=attention: rm.record_denoiser(model, v, a))
        for te in model.text_encoders:
            for variant in TEXT_VARIANTS:
                base, ti = variant.removesuffix("-ti"), variant.endswith("-ti")
                if (ti or "-keep-" in variant) and te.name not in model.trainable_text_encoders:
                    continue
                yield (f"{te.name}.{variant}.{attention}",
                       lambda n=te.name, v=base, a=attention, t=ti: rm.record_text_encoder(model, n, v, a, t))
        for variant in VAE_VARIANTS:
            yield f"vae.{variant}.{attention}", lambda v=variant, a=attention: rm.record_vae_encode(model, v, a)


TEMPLATE_METHODS = ("lora", "loha", "lokr", "hypernetwork")
TEMPLATE_VARIANTS = {"fp32": ("float32",), "amp-frozen": ("float32", "float16"), "pure": ("float16",),
                     "amp-frozen-int8": ("float32", "float16"), "amp-frozen-nf4": ("float32", "float16"),
                     "pure-int8": ("float16",), "pure-nf4": ("float16",)}


def template_jobs():
    """Every (method, layer kind, bias, variant, input dtype, regime) a catalog model can need."""
    from vramplan.models.inventory import load_inventory

    kinds = {("linear2", False), ("linear2", True), ("linear3", False), ("linear3", True)}
    for model in MODELS.values():
        for comp in model.components:
            for m in load_inventory(model.key, comp.name).convs():
                if m.kind == "Conv2d":
                    k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
                    kinds.add((f"conv:k{k}:s{s}:p{p}", m.bias))
    for method in TEMPLATE_METHODS:
        for kind, bias in sorted(kinds):
            if method == "hypernetwork" and kind != "linear3":
                continue
            for variant, x_dtypes in TEMPLATE_VARIANTS.items():
                if ("int8" in variant or "nf4" in variant) and (method != "lora" or not kind.startswith("linear")):
                    continue  # --base-quant: LoRA only (spec.py); bitsandbytes quantizes Linear layers
                for x_dtype in x_dtypes:
                    for regime in (("w2", "w2ab") if method == "lokr" else ("",)):
                        yield method, kind, bias, variant, x_dtype, regime


def record_templates(check: bool) -> int:
    from vramplan.simulate.record_templates import record_template, template_key

    path = TRACES / "templates.json.gz"
    store = {}
    started = time.time()
    for job in template_jobs():
        gc.collect()
        gc.disable()
        try:
            graph = record_template(*job)
        finally:
            gc.enable()
        store[template_key(*job)] = json.loads(dump(graph))
    print(f"{len(store)} templates in {time.time() - started:.1f} s")
    if check:
        with gzip.open(path, "rt") as f:
            shipped = json.load(f)
        same = {k: comparable(v) for k, v in shipped.items()} == {k: comparable(v) for k, v in store.items()}
        print("ok templates" if same else "DIFFERS templates")
        return 0 if same else 1
    tmp = path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:
        f.write(json.dumps(store, separators=(",", ":")).encode())
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    return 0


def dump(graph) -> str:
    return json.dumps(graph.to_json(), separators=(",", ":"))


def comparable(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "meta"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--only", nargs="*", help="graph names to (re)record, e.g. unet.fp32.sdpa")
    parser.add_argument("--check", action="store_true", help="compare with the shipped traces, write nothing")
    parser.add_argument("--templates", action="store_true", help="record the adapted-layer templates only")
    args = parser.parse_args(argv)
    if args.templates:
        return record_templates(args.check)
    failures = 0
    for key in args.model:
        model = MODELS[key]
        folder = TRACES / key
        folder.mkdir(parents=True, exist_ok=True)
        for name, record in jobs(model):
            if args.only and name not in args.only:
                continue
            gc.collect()
            gc.disable()
            started = time.time()
            try:
                graph = record()
            finally:
                gc.enable()
            path = folder / f"{name}.json.gz"
            if args.check:
                if not path.exists():
                    print(f"MISSING {key}/{name}")
                    failures += 1
                    continue
                with gzip.open(path, "rt") as f:
                    shipped = json.load(f)
                fresh = json.loads(dump(graph))
                same = comparable(shipped) == comparable(fresh)
                print(f"{'ok' if same else 'DIFFERS'} {key}/{name}")
                failures += not same
                continue
            tmp = path.with_suffix(".tmp")
            with gzip.GzipFile(tmp, "wb", mtime=0) as f:
                f.write(dump(graph).encode())
            tmp.replace(path)
            print(f"{key}/{name}: {len(graph.ops)} ops, {path.stat().st_size // 1024} KiB, "
                  f"{time.time() - started:.1f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
