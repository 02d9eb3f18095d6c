"""The `specray` command line: `generate`, `models pull|list` (and later serve, bench, ab, train).

Owns argument parsing only; every subcommand calls into the library. Errors a user can cause are
printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from specray.errors import SpecrayError


def _cmd_generate(args: argparse.Namespace) -> int:
    from specray.config import CacheConfig, EngineConfig, SchedulerConfig
    from specray.engine.llm_engine import LLMEngine
    from specray.engine.sampling_params import SamplingParams

    cfg = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
        cache=CacheConfig(page_size=args.page_size),
        scheduler=SchedulerConfig(max_model_len=args.max_model_len),
    )
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    load_s = time.perf_counter() - t0
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.seed if args.temperature > 0 else None, max_tokens=args.max_tokens, stop=tuple(args.stop or ()),
    )
    if args.chat:
        prompt = engine.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt = engine.encode(args.prompt)
    engine.add_request("cli", prompt, params)
    t1 = time.perf_counter()
    first_token_s = None
    out = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if first_token_s is None and out.new_token_ids:
                first_token_s = time.perf_counter() - t1
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
    total = time.perf_counter() - t1
    n = len(out.token_ids) if out else 0
    decode_tps = (n - 1) / (total - first_token_s) if n > 1 and first_token_s is not None else float("nan")
    print()
    print(
        f"[specray] {n} tokens in {total:.2f}s ({n / total:.1f} tok/s; decode {decode_tps:.1f} tok/s; "
        f"TTFT {1000 * (first_token_s or 0):.0f} ms; prompt {len(prompt)} tokens; load {load_s:.1f}s; "
        f"device {engine.device}; finish_reason={out.finish_reason if out else None})",
        file=sys.stderr,
    )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from specray.models import registry

    if args.models_cmd == "pull":
        path = registry.pull(args.name)
        print(path)
    else:
        cached = registry.list_cached()
        known = registry.KNOWN_MODELS
        print(f"{'NAME':<16} {'STATUS':<10} {'SIZE':>10}  PATH")
        cached_names = {c.name: c for c in cached}
        for name in known:
            c = cached_names.get(name)
            status, size, path = ("cached", f"{c.size_bytes / 2**20:.1f} MiB", str(c.path)) if c else ("-", "", "")
            print(f"{name:<16} {status:<10} {size:>10}  {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt and print tokens/s")
    g.add_argument("--model", default="smollm2-135m", help="registry name, HF directory or .gguf file")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--stop", action="append")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--page-size", type=int, default=16)
    g.add_argument("--max-model-len", type=int, default=None)
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("models", help="the model registry and cache")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    pull = msub.add_parser("pull", help="download a known model into the cache")
    pull.add_argument("name")
    msub.add_parser("list", help="show known and cached models")
    m.set_defaults(func=_cmd_models)

    from specray.pipelines.ab import add_ab_parser
    from specray.pipelines.bench import add_bench_parser

    add_bench_parser(sub)  # bench serve

    from specray.platform.serve import add_serve_parser

    add_serve_parser(sub)  # serve [CONFIG]
    add_ab_parser(sub)  # ab run | report
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpecrayError as e:
        print(f"specray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
