"""Does llama-server's ``--spec-type ngram-mod`` remember n-grams across requests? The same prompts, twice.

A peer check behind a reading in RESULTS.md (issue 25): one llama-server (``-np 1``, ``ngram-mod`` at its default
sizes: 48-64 drafts after a 24-token match) on a trained hyla model exported to GGUF f32; ``--prompts`` random
128-token prompts decoded greedily (128 tokens, no prompt cache), then the same prompts again. Printed per request:
decode tokens/s (its own ``timings.predicted_per_second``), drafted and accepted tokens. A second pass that drafts
far more than the first means drafts come from earlier requests' text, not only the request's own (what hyla's
prompt lookup uses).

    python benchmarks/ngram_mod_memory.py --model runs/small-stdlib --llama-bin DIR
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import tempfile
import urllib.request
from pathlib import Path

from llamacpp import soname_links, start_llama_server_or_no_repack

from hyla.bench import machine_description
from hyla.checkpoint import load_pretrained
from hyla.interop.gguf import export_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained model or run directory")
    parser.add_argument("--llama-bin", type=Path, required=True, help="llama.cpp's bin folder (see llamacpp.py)")
    parser.add_argument("--prompts", type=int, default=3)
    args = parser.parse_args()
    loaded = load_pretrained(args.model)
    rng = random.Random(5)
    vocab = loaded.model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(128)] for _ in range(args.prompts)]
    print(f"# {machine_description()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model-f32.gguf"
        export_gguf(loaded.model, loaded.tokenizer, path, "f32")
        libraries = soname_links(args.llama_bin, Path(tmp) / "lib")
        flags = ("--spec-type", "ngram-mod")
        server, url, _ = start_llama_server_or_no_repack(args.llama_bin, libraries, path, 1, 4096, flags)
        try:
            for attempt in (1, 2):
                for i, prompt in enumerate(prompts):
                    body = {"prompt": prompt, "n_predict": 128, "temperature": 0, "samplers": ["top_k"], "top_k": 1,
                            "cache_prompt": False, "ignore_eos": True}  # fmt: skip
                    request = urllib.request.Request(f"{url.removesuffix('/v1')}/completion", json.dumps(body).encode(),
                                                     {"Content-Type": "application/json"})  # fmt: skip
                    with urllib.request.urlopen(request, timeout=600) as response:
                        t = json.loads(response.read())["timings"]
                    print(f"pass {attempt}, prompt {i}: {t['predicted_per_second']:.0f} tok/s, drafted "
                          f"{t.get('draft_n', 0)}, accepted {t.get('draft_n_accepted', 0)}", flush=True)  # fmt: skip
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
