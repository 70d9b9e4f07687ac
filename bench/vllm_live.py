"""The live vLLM check, for a machine with a GPU and vLLM installed (not yet run: see RESULTS.md).

    python bench/vllm_live.py [--port 8765] [--timeout 600] [--dry-run]

1. Builds a tiny Llama in-process (hidden 256, 4 heads of 64, 2 layers, vocab 512, seeded)
   with a word-level tokenizer (`t0` .. `t511`), saved as safetensors to a scratch directory.
2. Publishes two versions of one LoRA (r=8 on q/k/v/o/gate/up/down, different seeds) as
   `live/sentiment@1` and `@2` in a fresh `DELTAHUB_HOME`, the tag `prod` on @1.
3. Starts `vllm serve DIR --enable-lora --max-lora-rank 8 --dtype bfloat16` with
   `VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_PLUGINS=deltahub` on 127.0.0.1 (waits for
   /health, bounded by --timeout), and requests one greedy token with the top-20 logprobs
   for the same prompt under `live/sentiment@prod`, `live/sentiment@2` and the base.
4. Runs the same prompt through deltahub (`load_base(dtype=bfloat16)` + `AdaptedModel.load(ref)`)
   and compares the 20 log-probabilities vLLM returned with deltahub's (tolerance 0.1
   nats, bf16), checks that the two versions differ by more than that, and stops the server
   (by pid). Prints one JSON line; exit 1 if a check fails.

`--dry-run` does steps 1, 2 and 4 on this machine (no vLLM) and prints deltahub's top
tokens, so the script's own parts are checked where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VOCAB = 512
TOL = 0.1
PROMPT = [5, 17, 42, 99, 7, 300, 12, 8]


def build_base(path: Path) -> None:
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2")
    fast.save_pretrained(path)


def publish_versions(base_dir: Path, work: Path) -> list[str]:
    import copy

    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from deltahub.compose import load_base
    from deltahub.registry import Registry

    base = tf.LlamaForCausalLM.from_pretrained(base_dir)
    fp = load_base(str(base_dir), device="cpu").deltahub_fingerprint
    reg = Registry()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for seed in (1, 2):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(str(work / f"v{seed}"))
        reg.publish(
            work / f"v{seed}",
            "live/sentiment",
            tags=["prod"] if seed == 1 else [],
            base_model=str(base_dir),
            base_fingerprint=fp,
        )
    return ["live/sentiment@prod", "live/sentiment@2"]


def deltahub_logprobs(base_dir: Path, ref: str | None) -> torch.Tensor:
    """log_softmax of the next token after PROMPT, base in bf16, by deltahub."""
    from deltahub.compose import AdaptedModel, load_base

    model = AdaptedModel(load_base(str(base_dir), dtype="bfloat16"))
    if ref is not None:
        model.activate([model.load(ref)])
    ids = torch.tensor([PROMPT], device=next(model.base.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    return torch.log_softmax(logits, -1).cpu()


def serve(base_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_PLUGINS": "deltahub"}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(base_dir), "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2",
        "--dtype", "bfloat16", "--max-model-len", "128", "--gpu-memory-utilization", "0.3",
        "--enforce-eager",
    ]  # fmt: skip
    return subprocess.Popen(
        cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def vllm_logprobs(port: int, model: str) -> dict[int, float]:
    import httpx

    r = httpx.post(
        f"http://127.0.0.1:{port}/v1/completions",
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 20,
            "return_tokens_as_token_ids": True,
        },
        timeout=120,
    )
    r.raise_for_status()
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    return {int(k.split(":", 1)[1]): float(v) for k, v in top.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vllm-live-"))
    os.environ["DELTAHUB_HOME"] = str(work / "home")
    base_dir = work / "tiny-llama"
    build_base(base_dir)
    refs = publish_versions(base_dir, work)
    ours = {ref: deltahub_logprobs(base_dir, ref) for ref in [*refs, None]}
    if args.dry_run:
        print(json.dumps({ref or "base": ours[ref].topk(5).indices.tolist() for ref in ours}))
        return
    proc = serve(base_dir, args.port, work / "vllm.log")
    result: dict = {"vllm_log": str(work / "vllm.log")}
    ok = True
    try:
        import httpx

        deadline = time.monotonic() + args.timeout
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not come up; see {work / 'vllm.log'}")
            try:
                if httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        for ref in [*refs, None]:
            got = vllm_logprobs(args.port, ref or str(base_dir))
            gap = max(abs(lp - float(ours[ref][t])) for t, lp in got.items())
            result[ref or "base"] = {"max_abs_logprob_gap": gap, "top": sorted(got, key=got.get)[-5:]}
            ok &= gap <= TOL
        a, b = (ours[r] for r in refs)
        result["versions_differ_by"] = float((a - b).abs().max())
        ok &= result["versions_differ_by"] > TOL
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    result["ok"] = ok
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
