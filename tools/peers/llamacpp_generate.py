"""llama-cpp-python's greedy generation on a GGUF, timed as `tightfit generate --stats` times its own.

The prompt's time runs from the call to the first generated token; the decoding rate is the tokens
after the first over the time from the first to the last (each a cached decode step and a choice).
Prints one line `RESULT {json}`.

  python tools/peers/llamacpp_generate.py --model M.gguf --prompt "Once upon a time" --max-new 128 --threads 2
"""
import argparse
import json
import time

from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024)
    a = ap.parse_args()
    llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.ctx, verbose=False)
    prompt = llm.tokenize(a.prompt.encode())
    start = time.perf_counter()
    stamps = []
    # Token by token, as tightfit generates: greedy, stopping at the end-of-generation token or max-new.
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if llm.token_eos() == token or len(stamps) == a.max_new:
            break
    if not stamps:
        raise SystemExit("error: llama-cpp-python generated no token")
    decode_s = stamps[-1] - stamps[0]
    print("RESULT " + json.dumps({
        "tool": "llama-cpp-python", "prompt_tokens": len(prompt), "new_tokens": len(stamps),
        "prompt_s": stamps[0] - start, "decode_s": decode_s,
        "decode_tokens_per_s": (len(stamps) - 1) / decode_s if decode_s > 0 else 0.0}))


if __name__ == "__main__":
    main()
