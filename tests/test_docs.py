"""Every command and name the docs give a user is current.

The docs are README.md, CHANGELOG.md and docs/*.md. From their code (inline `spans` and fenced
blocks) and links this reads:
- library names: `captioning.x.y`, and `module.Symbol` / `Class.method` whose first part is a
  module of the package or a class or function it defines: imported, then looked up attribute by
  attribute (a dotted name the code writes as a string, such as an MLflow tag, counts as current);
- commands: `python stages/X.py`, `python bench/X.py`, `python -m captioning.X`, the console
  scripts (`caption...`, from pyproject.toml), `bash scripts/X.sh`, `bash bench/X.sh`: the file,
  module or entry point exists, and each `--flag` the docs pass it appears in its `--help` (run
  once per script, all in one interpreter);
- repo paths under stages/ src/ bench/ scripts/ tests/ presets/ docs/ exist; `git show REV:path`
  names a file of that commit; links to repo files (and their #anchors) resolve;
- params: `section.key` spans, `-S key=value`, `caption-compare --by/--where` name keys of
  params.yaml; `dvc repro [-f] STAGE` and "the `X` stage" name stages of dvc.yaml.

A failure lists each stale reference as doc:line, the reference, and why.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import pkgutil
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from conftest import venv_env

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
PATH_ROOTS = ("stages", "src", "bench", "scripts", "tests", "presets", "docs")
# A dotted span ending like this is a file name (`params.yaml`, `dvc.lock`), not a Python name.
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "md", "csv", "tsv", "pt", "pth", "npy", "html", "txt", "lock",
                 "db", "zip", "jpg", "jpeg", "png", "sh", "toml", "whl", "cfg", "ini", "gz", "tar"}
SHELL_SPLIT = re.compile(r"&&|\|\||;|\||\$\(|\)")


@dataclass(frozen=True)
class Code:
    """One piece of code in a doc: an inline span or a (continued) line of a fenced block."""
    doc: str
    line: int
    text: str
    inline: bool
    lang: str = ""

    def where(self) -> str:
        return f"{self.doc}:{self.line}"


@dataclass(frozen=True)
class Doc:
    name: str
    path: Path
    text: str
    prose: str  # the text with fenced blocks blanked (line numbers kept)
    code: tuple[Code, ...]


def _parse(path: Path) -> Doc:
    name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
    lines = path.read_text().splitlines()
    prose, code, fence, lang, pending = [], [], None, "", None
    for no, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, lang = stripped[:3], stripped[3:].strip().lower()
            prose.append("")
            continue
        if fence is not None:
            prose.append("")
            if stripped.startswith(fence):
                fence = None
                continue
            if pending:  # a line continued with a backslash
                pending = (pending[0], pending[1][:-1] + " " + stripped)
            else:
                pending = (no, stripped)
            if not pending[1].endswith("\\"):
                code.append(Code(name, pending[0], pending[1], inline=False, lang=lang))
                pending = None
            continue
        prose.append(line)
    text = "\n".join(prose)
    for match in re.finditer(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)", text):
        code.append(Code(name, text.count("\n", 0, match.start()) + 1, " ".join(match.group(1).split()),
                         inline=True))
    return Doc(name, path, path.read_text(), text, tuple(code))


@cache
def docs() -> tuple[Doc, ...]:
    return tuple(_parse(p) for p in DOCS if p.exists())


# ---- what the repo holds ------------------------------------------------------------------------

@cache
def params_keys() -> tuple[set[str], set[str]]:
    """(every dotted key of params.yaml, its sections)."""
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    keys: set[str] = set()

    def walk(node, prefix):
        for k, v in node.items():
            keys.add(prefix + k)
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
    walk(tree, "")
    return keys, {k for k, v in tree.items() if isinstance(v, dict)}


@cache
def stages() -> set[str]:
    return set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


@cache
def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})


@cache
def package() -> tuple[set[str], dict[str, list[object]]]:
    """(the package's module names, {name: [objects]} of the classes and functions it defines)."""
    import captioning
    modules, symbols = set(), {}
    for info in pkgutil.iter_modules(captioning.__path__):
        modules.add(info.name)
        module = importlib.import_module(f"captioning.{info.name}")
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and \
                    getattr(obj, "__module__", "").startswith("captioning") and not name.startswith("_"):
                symbols.setdefault(name, []).append(obj)
    return modules, symbols


@cache
def code_strings() -> str:
    """The source of the package and the stages: a dotted name found quoted there is one the code
    writes (an MLflow tag or metric), not a Python name."""
    files = [*(REPO / "src" / "captioning").rglob("*.py"), *(REPO / "stages").glob("*.py")]
    return "\n".join(p.read_text() for p in files)


def _resolve(dotted: str) -> str | None:
    """None if `captioning.a.b.c` imports and looks up; else why not."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            if importlib.util.find_spec(name) is None:
                continue
        except ModuleNotFoundError:
            continue
        obj = importlib.import_module(name)
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return f"{name} has no {attr!r}"
            obj = getattr(obj, attr)
        return None
    return "no such module"


def _quoted_in_code(name: str) -> bool:
    return f'"{name}"' in code_strings() or f"'{name}'" in code_strings()


# ---- library names ------------------------------------------------------------------------------

def _expand(key: str) -> list[str]:
    """`model.{backbone,image_size}` and `model.backbone/image_size` -> one key each."""
    brace = re.fullmatch(r"([\w.]+\.)\{([\w,]+)\}", key)
    if brace:
        return [brace.group(1) + k for k in brace.group(2).split(",")]
    first, *rest = key.split("/")
    section = first.rsplit(".", 1)[0]
    return [first, *(f"{section}.{k}" for k in rest)]


def _param_problem(key: str) -> str | None:
    keys, sections = params_keys()
    for one in _expand(key):
        if one.endswith(".*"):
            if one[:-2] not in sections:
                return f"params.yaml has no section {one[:-2]!r}"
        elif one not in keys:
            return f"params.yaml has no key {one!r}"
    return None


def _name_problems(code: Code) -> list[str]:
    modules, symbols = package()
    _, sections = params_keys()
    problems = []
    for match in re.finditer(r"(?<![\w./-])captioning(?:\.\w+)+", code.text):
        name = match.group(0)
        if name.rsplit(".", 1)[-1] in FILE_SUFFIXES or _quoted_in_code(name):
            continue
        why = _resolve(name)
        if why:
            problems.append(f"{code.where()}: `{name}`: {why}")
    if code.lang == "python":
        for match in re.finditer(r"from (captioning[\w.]*) import ([\w, ]+)", code.text):
            for attr in match.group(2).replace(" ", "").split(","):
                why = _resolve(f"{match.group(1)}.{attr}")
                if why:
                    problems.append(f"{code.where()}: `from {match.group(1)} import {attr}`: {why}")
    if not code.inline:
        return problems
    # A span that is only a dotted name, maybe called: `optim.adam`, `Split.captioned()`, `train.lr: 0.004`
    span = re.fullmatch(r"([A-Za-z_][\w*{},/]*(?:\.[\w*{},/]+)+)(?:\(.*\))?(?:\s*[:=]\s*[^\s;]*)?", code.text)
    if not span:
        return problems
    name = span.group(1)
    first, *rest = name.split(".")
    if first == "captioning" or name.rsplit(".", 1)[-1] in FILE_SUFFIXES or _quoted_in_code(name):
        return problems
    param_why = _param_problem(name) if first in sections else None
    if first in sections and param_why is None:
        return problems
    if first in modules and re.fullmatch(r"[\w.]+", name):
        why = _resolve(f"captioning.{name}")
        if why is None:
            return problems
        problems.append(f"{code.where()}: `{name}`: neither a params.yaml key nor a name of the package "
                        f"(captioning.{name}: {why})" if first in sections else f"{code.where()}: `{name}`: {why}")
    elif first in symbols and re.fullmatch(r"[\w.]+", name):
        if not any(_has_path(obj, rest) for obj in symbols[first]):
            problems.append(f"{code.where()}: `{name}`: {first} has no {'.'.join(rest)!r}")
    elif param_why:
        problems.append(f"{code.where()}: `{code.text}`: {param_why}")
    return problems


def _has_path(obj, attrs: list[str]) -> bool:
    for attr in attrs:
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def name_problems(docs_) -> list[str]:
    return [p for doc in docs_ for code in doc.code for p in _name_problems(code)]


def test_library_names_exist():
    problems = name_problems(docs())
    assert not problems, "stale library names in the docs:\n" + "\n".join(problems)


# ---- commands -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    code: Code
    kind: str     # script | module | console | shell
    target: str   # the path, module or console-script name
    args: tuple[str, ...]


def _words(segment: str) -> list[str]:
    segment = segment.split(" #", 1)[0]
    try:
        return shlex.split(segment, comments=True)
    except ValueError:
        return segment.split()


def commands(code: Code) -> list[Command]:
    found = []
    for segment in SHELL_SPLIT.split(code.text):
        words = _words(segment)
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value before a command
            words = words[1:]
        if not words:
            continue
        head, rest = words[0], words[1:]
        if head in ("python", "python3") and rest:
            if rest[0] == "-m" and len(rest) > 1 and rest[1].startswith("captioning"):
                found.append(Command(code, "module", rest[1], tuple(rest[2:])))
            elif re.match(r"(stages|bench)/\w+\.py$", rest[0]):
                found.append(Command(code, "script", rest[0], tuple(rest[1:])))
        elif head == "bash" and rest and re.match(r"(scripts|bench)/[\w-]+\.sh$", rest[0]):
            found.append(Command(code, "shell", rest[0], tuple(rest[1:])))
        elif re.fullmatch(r"caption(-[a-z]+)*", head):
            found.append(Command(code, "console", head, tuple(rest)))
    return found


def all_commands(docs_) -> list[Command]:
    return [c for doc in docs_ for code in doc.code for c in commands(code)]


# Runs each target's --help in one interpreter (torch is imported once, not once per script):
# argparse prints the help and exits before any work.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys, traceback
out = {}
for kind, target, entry in json.loads(sys.argv[1]):
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [target, "--help"]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if kind == "script":
                runpy.run_path(target, run_name="__main__")
            elif kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                module, func = entry.split(":")
                getattr(__import__(module, fromlist=[func]), func)()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        code, stderr = 1, io.StringIO(traceback.format_exc())
    out[kind + " " + target] = [code, stdout.getvalue(), stderr.getvalue()]
print(json.dumps(out))
"""


@cache
def helps(wanted: tuple[tuple[str, str], ...]) -> dict[tuple[str, str], tuple[int, str, str]]:
    """(exit code, stdout, stderr) of `--help` of each (kind, target), once each."""
    targets = [(kind, target, console_scripts().get(target, "")) for kind, target in wanted]
    done = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(targets)], cwd=REPO, env=venv_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    return {(kind, target): tuple(results[f"{kind} {target}"]) for kind, target in wanted}


def _exists(command: Command) -> str | None:
    if command.kind in ("script", "shell"):
        return None if (REPO / command.target).is_file() else f"{command.target} does not exist"
    if command.kind == "module":
        try:
            found = importlib.util.find_spec(command.target)
        except ModuleNotFoundError:
            found = None
        return None if found else f"no module {command.target}"
    if command.target not in console_scripts():
        return f"pyproject.toml has no console script {command.target!r}"
    return None


def _flags(args: tuple[str, ...]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if re.fullmatch(r"--[a-z][\w-]*(=.*)?", a)]


def command_problems(docs_) -> list[str]:
    problems = []
    found = all_commands(docs_)
    runnable = tuple(sorted({(c.kind, c.target) for c in found if c.kind != "shell" and _exists(c) is None}))
    for command in found:
        label = f"{command.code.where()}: `{command.code.text}`"
        why = _exists(command)
        if why:
            problems.append(f"{label}: {why}")
            continue
        if command.kind == "shell":
            continue
        code, stdout, stderr = helps(runnable)[(command.kind, command.target)]
        if code != 0:
            last = (stderr.strip().splitlines() or ["no output"])[-1]
            problems.append(f"{label}: `{command.target} --help` failed: {last}")
            continue
        for flag in _flags(command.args):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", stdout):
                problems.append(f"{label}: {command.target} has no {flag}")
    return problems


def test_commands_exist_and_take_their_flags():
    problems = command_problems(docs())
    assert not problems, "stale commands in the docs:\n" + "\n".join(problems)


# ---- params and stages --------------------------------------------------------------------------

def params_problems(docs_) -> list[str]:
    problems = []
    for doc in docs_:
        for code in doc.code:
            for match in re.finditer(r"(?<!\S)-S\s+['\"]?([\w.]+)=", code.text):
                why = _param_problem(match.group(1))
                if why:
                    problems.append(f"{code.where()}: `-S {match.group(1)}=`: {why}")
            for command in commands(code):
                if command.target == "caption-compare":
                    args = list(command.args)
                    for flag, value in zip(args, args[1:]):
                        if flag in ("--by", "--where"):
                            why = _param_problem(value.split("=", 1)[0])
                            if why:
                                problems.append(f"{code.where()}: `{flag} {value}`: {why}")
            for match in re.finditer(r"\bdvc repro((?:\s+-\w+)*)\s+([a-z]\w*)", code.text):
                if match.group(2) not in stages():
                    problems.append(f"{code.where()}: `dvc repro ... {match.group(2)}`: dvc.yaml has no stage "
                                    f"{match.group(2)!r}")
        for match in re.finditer(r"`(\w+)` stage\b", doc.prose):
            if match.group(1) not in stages():
                line = doc.prose.count("\n", 0, match.start()) + 1
                problems.append(f"{doc.name}:{line}: the `{match.group(1)}` stage: dvc.yaml has no such stage")
    return problems


def test_params_and_stages_exist():
    problems = params_problems(docs())
    assert not problems, "stale params or stages in the docs:\n" + "\n".join(problems)


# ---- paths and links ----------------------------------------------------------------------------

def _git_has(rev: str, path: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{rev}:{path}"], cwd=REPO, capture_output=True).returncode == 0


def _path_problem(path: str) -> str | None:
    path = path.rstrip(".,:;)")
    if "<" in path or "..." in path or "…" in path:
        return None
    brace = re.search(r"\{([^}]*)\}", path)
    candidates = [path[:brace.start()] + alt + path[brace.end():] for alt in brace.group(1).split(",")] \
        if brace else [path]
    for one in candidates:
        if "*" in one:
            if not list(REPO.glob(one)):
                return f"nothing matches {one}"
        elif not (REPO / one).exists():
            return f"{one} does not exist"
    return None


def path_problems(docs_) -> list[str]:
    problems = []
    roots = "|".join(PATH_ROOTS)
    for doc in docs_:
        for code in doc.code:
            shown = set()
            for match in re.finditer(r"git show ([0-9a-f]{7,40}):([\w./-]+)", code.text):
                shown.add(match.group(2))
                if not _git_has(match.group(1), match.group(2)):
                    problems.append(f"{code.where()}: `git show {match.group(1)}:{match.group(2)}`: no such file "
                                    f"in that commit")
            for match in re.finditer(rf"(?<![\w./:-])((?:{roots})/[\w./*{{}},<>-]*)", code.text):
                if match.group(1) in shown:
                    continue
                why = _path_problem(match.group(1))
                if why:
                    problems.append(f"{code.where()}: `{match.group(1)}`: {why}")
        for match in re.finditer(r"\b[0-9a-f]{7,40}\b", " ".join(c.text for c in doc.code if doc.name == "CHANGELOG.md")):
            if subprocess.run(["git", "cat-file", "-e", f"{match.group(0)}^{{commit}}"], cwd=REPO,
                              capture_output=True).returncode:
                problems.append(f"{doc.name}: `{match.group(0)}`: no such commit")
    return problems


def test_repo_paths_exist():
    problems = path_problems(docs())
    assert not problems, "repo paths in the docs that do not exist:\n" + "\n".join(problems)


def _slug(heading: str) -> str:
    heading = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading))


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", _parse(path).prose, re.M)}


def link_problems(docs_) -> list[str]:
    problems = []
    for doc in docs_:
        for match in re.finditer(r"\]\(([^)\s]+)\)", doc.prose):
            target = match.group(1)
            if re.match(r"[a-z]+:", target):
                continue
            line = doc.prose.count("\n", 0, match.start()) + 1
            file, _, anchor = target.partition("#")
            path = (doc.path.parent / file).resolve() if file else doc.path
            if not path.exists():
                problems.append(f"{doc.name}:{line}: link ({target}): {file} does not exist")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                problems.append(f"{doc.name}:{line}: link ({target}): no heading #{anchor} in {file or doc.name}")
    return problems


def test_links_resolve():
    problems = link_problems(docs())
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


STALE = """# A page of stale references

`captioning.model.NoSuchThing`, `optim.no_such_function`, `Decoding.no_such_method`, `train.no_such_key`,
`model.no_such_key`, and the `no_such` stage. Links: [gone](gone.md), [anchor](#no-such-heading).

```bash
python bench/long_run.py --no-such-flag
python bench/no_such_script.py
python -m captioning.no_such_module
caption-no-such-command --help
dvc exp run -S train.no_such_key=1 && dvc repro -f no_such_stage
caption-compare --by model.no_such_key
git show 7ed6275:bench/no_such_file.py
cat stages/no_such_stage.py
```
"""


def test_the_checks_catch_stale_references(tmp_path):
    """Each check flags what it exists to flag, naming the doc and line."""
    (tmp_path / "stale.md").write_text(STALE)
    doc = _parse(tmp_path / "stale.md")
    found = "\n".join(name_problems([doc]) + command_problems([doc]) + params_problems([doc]) +
                      path_problems([doc]) + link_problems([doc]))
    for stale in ("captioning.model.NoSuchThing", "optim.no_such_function", "Decoding.no_such_method",
                  "train.no_such_key", "model.no_such_key", "the `no_such` stage", "gone.md", "#no-such-heading",
                  "has no --no-such-flag", "bench/no_such_script.py does not exist", "no module captioning.no_such_module",
                  "no console script 'caption-no-such-command'", "-S train.no_such_key=", "no_such_stage'",
                  "--by model.no_such_key", "bench/no_such_file.py", "stages/no_such_stage.py"):
        assert stale in found, f"not flagged: {stale}\n{found}"
    assert "stale.md:3: `captioning.model.NoSuchThing`" in found

