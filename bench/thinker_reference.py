"""Write ``btpo_cli/models/thinker_reference.json`` from built tiny-thinkers (the README table's base models).

Build (or reuse) the thinkers first, e.g. ``btpo base-model`` per seed or ``btpo demo --thinker-seeds 0,1``,
then::

    python bench/thinker_reference.py --seeds 0,1 [--cache DIR]

It reads ``<cache>/models/tiny-thinker-v<VERSION>-s<seed>/btpo_thinker.json`` for each seed and
records their weights / tokenizer sha256, final pre-training loss and the environment of the
first one (all must have been built with the same library versions, CPU capability and CPU flags), and the lock
they were built in: ``requirements/venv.lock``'s sha256 and key versions (docs/environment.md). It
refuses unless this environment is that locked set and the thinkers were built with its versions,
with the fixed CPU kernels (``btpo_cli/cpu_kernels.py``), and record their CPU flags.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from btpo_cli.envlock import KEY_PACKAGES, VENV_LOCK, base_version, lock_status  # noqa: E402
from btpo_cli.models.thinker import REFERENCE_FILE, VERSION, ThinkerSpec, thinker_dir  # noqa: E402
from btpo_cli.models.tiny import tiny_cache_root  # noqa: E402

ENV_KEYS = ("python", "torch", "transformers", "tokenizers", "accelerate", "machine", "system",
            "cpu_capability", "cpu_flags", "blas", "build_threads", "kernels")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REFERENCE_FILE)
    a = ap.parse_args()
    seeds, env = {}, None
    for s in (int(x) for x in a.seeds.split(",")):
        path = thinker_dir(ThinkerSpec(seed=s), a.cache or tiny_cache_root()) / "btpo_thinker.json"
        if not path.is_file():
            print(f"thinker_reference: {path} not found (build tiny-thinker-s{s} first)", file=sys.stderr)
            return 2
        info = json.loads(path.read_text(encoding="utf-8"))
        e = {k: info["built_with"].get(k) for k in ENV_KEYS}
        if env is not None and e != env:
            print(f"thinker_reference: seed {s} was built in another environment: {e} vs {env}", file=sys.stderr)
            return 2
        if not e.get("cpu_flags"):   # without them the slow demo test cannot tell another CPU model apart
            print(f"thinker_reference: {path} records no cpu_flags (built by an older btpo): rebuild it "
                  f"(btpo base-model --seed {s} --force)", file=sys.stderr)
            return 2
        if e.get("kernels") in (None, "native"):   # the machine's own kernels: the digits of one CPU model only
            print(f"thinker_reference: {path} was built with the machine's own CPU kernels ({e.get('kernels')}): "
                  f"rebuild it with `btpo base-model --seed {s} --force` (fixed kernels, btpo_cli/cpu_kernels.py)",
                  file=sys.stderr)
            return 2
        env = e
        seeds[str(s)] = {"weights_sha256": info["weights_sha256"], "tokenizer_sha256": info["tokenizer_sha256"],
                         "final_loss": info["final_loss"]}
    st = lock_status(VENV_LOCK)
    if st.status != "locked":
        print(f"thinker_reference: {st.line()}", file=sys.stderr)
        return 2
    versions = {k: st.pins[k] for k in KEY_PACKAGES if k in st.pins}
    built = {k: base_version(env[k]) for k in versions if env and env.get(k)}
    if built != versions:
        print(f"thinker_reference: the thinkers were built with {built}, the lock has {versions}", file=sys.stderr)
        return 2
    lock = {"file": "requirements/venv.lock", "sha256": st.sha256, "versions": versions}
    a.out.write_text(json.dumps({"version": VERSION, "built_with": env, "lock": lock, "seeds": seeds}, indent=2)
                     + "\n", encoding="utf-8")
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
