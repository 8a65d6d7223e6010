"""Equivalence tests left in the migrated repository (``--emit-tests DIR``; see ``docs/cli.md``).

One pytest module per migrated file. For every rewritten site it holds the two programs
the verifier ran (the loop and its backward slice, frozen as a plain function of its
inputs, and the replacement as written, importing the target's own utility), the cases
the verifier compared them on, and a test that compares them again with the verifier's
own judging code (``harness.py``, copied in verbatim). It needs torch and pytest only.

A module is rewritten only to add the sections of sites it does not have yet: sections are
keyed by their content, so a re-run is idempotent, and a section written once survives
the migration of its site (after which its loop can no longer be read off the pipeline).
"""

from __future__ import annotations

import ast
import hashlib
import keyword
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import libcst as cst

from mtp_migrate.mtp_loop.plan import MARKER, Decision
from mtp_migrate.mtp_loop.spec import Action, SiteReport
from mtp_migrate.verify.program import SiteProgram
from mtp_migrate.verify.slots import SLOT_PREFIX

HARNESS = Path(__file__).with_name("harness.py")
GENERATED = "# mtp-migrate: generated equivalence tests"
_SECTION = re.compile(r"^# === mtp-migrate site (?P<key>[0-9a-f]+): line (?P<line>\d+), in (?P<function>\S+) ===$", re.M)
_TOP_LEVEL_NAME = re.compile(r"^(?:def |class )?(\w+)", re.M)  # what a section binds
_GUARDED = re.compile(r'^GUARDED_FILE = "(?P<path>[^"\n]*)"$', re.M)


@dataclass
class GuardedSite:
    """What one rewritten site's test needs: its programs, the cases compared, where it is now."""

    line: int  # the replacement's first line in the migrated file
    function: str  # the enclosing function ("module" at the top level)
    program: SiteProgram
    cases: list[str] = field(default_factory=list)  # ``Case(...)`` source, as the verifier compared them

    @property
    def key(self) -> str:
        program = asdict(self.program)
        content = [program["original"], program["rewritten"], program["outputs"], program["slots"], self.cases]
        return hashlib.sha256(repr(content).encode()).hexdigest()[:12]


class Recorder:
    """A verifier that keeps, from its last call (the decisions that stand), what the tests need."""

    def __init__(self, verifier):
        self.verifier = verifier
        self.evidence: dict[int, tuple[SiteProgram, list[str]]] = {}
        self.written: cst.Module | None = None
        self.decisions: list[Decision] = []

    def __call__(self, original, written, decisions, utility):
        self.evidence = {}
        self.written, self.decisions = written, decisions
        return self.verifier(original, written, decisions, utility, evidence=self.evidence)

    def sites(self, reports: list[SiteReport]) -> list[GuardedSite]:
        rewritten = {r.line for r in reports if r.action is Action.REWRITTEN and r.verified}
        if self.written is None or not rewritten:
            return []
        lines = _migrated_lines(self.written.code)
        guarded = []
        for decision in self.decisions:
            if decision.line in rewritten and decision.line in self.evidence:
                program, cases = self.evidence[decision.line]
                scope = decision.site.scope
                function = scope.name.value if isinstance(scope, cst.FunctionDef) else "module"
                guarded.append(GuardedSite(lines.get(decision.line, decision.line), function, program, cases))
        return guarded


def _migrated_lines(marked: str) -> dict[int, int]:
    """``{site line: line of its replacement once the markers are gone}``."""
    found, pending, markers = {}, [], 0
    for number, text in enumerate(marked.splitlines(), 1):
        stripped = text.strip()
        if stripped.startswith(MARKER):
            markers += 1
            pending.append(int(stripped[len(MARKER):]))
        elif pending and stripped and not stripped.startswith("#"):
            for site in pending:
                found.setdefault(site, number - markers)
            pending = []
    return found


def module_name(pipeline: Path) -> str:
    return f"test_mtp_migration_{_identifier(pipeline.stem)}.py"


def qualified_module_name(pipeline: Path) -> str:
    """For two pipelines of one stem: the path, so that neither takes the other's module."""
    parts = pipeline.with_suffix("").parts
    return f"test_mtp_migration_{_identifier('_'.join(p for p in parts if p not in ('/', '..', '.')))}.py"


def _identifier(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_") or "pipeline"


def is_generated(text: str) -> bool:
    return GENERATED in text.splitlines()[:60]


def guarded_file(text: str) -> str | None:
    match = _GUARDED.search(text)
    return match.group("path") if match else None


def render(module_path: Path, pipeline: Path, sites: list[GuardedSite], import_root: Path, revision: str,
           existing: str | None = None) -> str:
    """The module's text: ``existing`` with the sections of ``sites`` it lacks (``existing`` if none)."""
    kept = _sections(existing) if existing else []
    keys = {section["key"] for section in kept}
    new = [site for site in sites if site.key not in keys]
    if existing and not new:
        return existing
    taken = {name for section in kept for name in _TOP_LEVEL_NAME.findall(section["text"])}
    texts = [section["text"] for section in kept]
    listed = [(int(section["line"]), section["function"]) for section in kept]
    for site in new:
        suffix, count = f"line_{site.line}", 1
        while f"original_{suffix}" in taken:  # an earlier section of the same line (the file changed since)
            count += 1
            suffix = f"line_{site.line}_{count}"
        text = _section(site, pipeline, suffix)
        taken |= set(_TOP_LEVEL_NAME.findall(text))
        texts.append(text)
        listed.append((site.line, site.function))
    return _header(module_path, pipeline, listed, import_root, revision) + "\n\n".join(texts)


def _sections(text: str) -> list[dict]:
    starts = list(_SECTION.finditer(text))
    sections = []
    for index, match in enumerate(starts):
        end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        sections.append({**match.groupdict(), "text": text[match.start():end].rstrip("\n") + "\n"})
    return sections


def guarded_path(module_path: Path, pipeline: Path) -> str:
    """The pipeline's path as the module names it: relative to the module's folder."""
    return Path(os.path.relpath(pipeline.resolve(), module_path.parent.resolve())).as_posix()


def _header(module_path: Path, pipeline: Path, listed: list[tuple[int, str]], import_root: Path,
            revision: str) -> str:
    here = module_path.parent.resolve()
    shown = guarded_path(module_path, pipeline)
    sites = "\n".join(f"- line {line}, in `{function}`" for line, function in sorted(listed))
    relative = Path(os.path.relpath(import_root.resolve(), here)).as_posix()
    root = f'IMPORT_ROOT = (Path(__file__).parent / "{relative}").resolve()  # where the pipeline imports from'
    imports, body = _harness()
    return f'''"""Equivalence tests for the MTP loss migration of `{pipeline.name}` ({shown}).

Generated by mtp-migrate (`apply --emit-tests`), last from revision {revision}. For each site
the migration rewrote, this module keeps the loop as it was, frozen as a plain function of
its inputs (the loop and every statement it depends on), and the code that replaced it,
which imports this repository's own loss utility. Each test runs both on the inputs the
migration was verified on and compares values and gradients: within 1e-9 in fp64; in
lower precision, the new code's error against an fp64 truth must be no worse than the
loop's. A failure means the utility no longer computes what the loop computed there.

Sites guarded (lines of the migrated file):
{sites}

Needs torch and pytest only. A re-run of `mtp-migrate apply --emit-tests` adds the sections
of newly migrated sites and keeps these; delete a section rather than edit it.
"""
{GENERATED}

{imports}

GUARDED_FILE = "{shown}"
{root}

{body}


'''


def _harness() -> tuple[str, str]:
    """``harness.py``'s imports, with pytest's, sorted as isort would; and its code after them."""
    source = HARNESS.read_text(encoding="utf-8")
    tree = ast.parse(source)
    imports = [node for node in tree.body[1:] if isinstance(node, ast.Import | ast.ImportFrom)]
    start = next(node for node in tree.body[1:] if not isinstance(node, ast.Import | ast.ImportFrom)).lineno
    groups: dict[str, list[tuple]] = {"__future__": [], "stdlib": [], "third": [(0, "pytest", "import pytest")]}
    for node in imports:
        module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
        group = "__future__" if module == "__future__" else "stdlib" if module.split(".")[0] in \
            sys.stdlib_module_names else "third"
        groups[group].append((isinstance(node, ast.ImportFrom), module, ast.get_source_segment(source, node)))
    blocks = ["\n".join(line for *_, line in sorted(group)) for group in groups.values() if group]
    return "\n\n".join(blocks), "\n".join(source.splitlines()[start - 1:])


def _section(site: GuardedSite, pipeline: Path, suffix: str) -> str:
    program = site.program
    names = _readable(program)

    def rename(text: str) -> str:
        return re.sub(rf"\b{SLOT_PREFIX}\d+\b", lambda found: names[found.group(0)], text)

    original = _function(rename(program.original), "original", suffix)
    rewritten = _function(rename(program.rewritten), "rewritten", suffix)
    inputs = "\n".join(f"    Input({names[s.param]!r}, {s.path!r}, {s.kind!r}, {s.rank!r})," for s in program.slots)
    cases = "\n".join(f"    {rename(case)}," for case in dict.fromkeys(site.cases))
    upper = suffix.upper()
    test = f"test_{_identifier(pipeline.stem)}_{suffix}_{_identifier(site.function)}"
    return f'''# === mtp-migrate site {site.key}: line {site.line}, in {site.function} ===


{original}


{rewritten}


INPUTS_{upper} = [
{inputs}
]
OUTPUTS_{upper} = {program.outputs!r}
CASES_{upper} = [
{cases}
]


@pytest.mark.parametrize("case", CASES_{upper}, ids=case_id)
def {test}(case):
    """`{pipeline.name}` line {site.line}, in `{site.function}`: the call computes what the loop computed."""
    check(original_{suffix}, rewritten_{suffix}, INPUTS_{upper}, OUTPUTS_{upper}, case, IMPORT_ROOT)
'''


def _function(source: str, name: str, suffix: str) -> str:
    """The program as a module-level function ``<name>_<suffix>``, without the verifier's site markers;
    a line that binds an input to itself (``weights = weights``, once the parameter is named after
    it) is dropped."""
    lines = cst.parse_module(source).visit(_Tidy()).code.rstrip("\n").splitlines()
    lines[0] = lines[0].replace(f"def {name}(", f"def {name}_{suffix}(", 1)
    body = [line for line in lines[1:] if not line.strip().startswith(MARKER) and
            not re.fullmatch(r"\s*(\w+) = \1", line)]
    return "\n".join([lines[0], *body])


class _Tidy(cst.CSTTransformer):
    """What a user's lint run flags in the programs' code, changed without changing its meaning:
    ``import a.b as b`` -> ``from a import b``, the same module under the same name (ruff's PLR0402, a
    default rule of ruff 0.17; the loop's file may spell it either way), and blank lines with spaces (W293)."""

    def leave_Import(self, original_node: cst.Import, updated_node: cst.Import) -> cst.BaseSmallStatement:
        alias = updated_node.names[0]
        if len(updated_node.names) == 1 and isinstance(alias.name, cst.Attribute) and alias.asname is not None \
                and isinstance(alias.asname.name, cst.Name) and alias.asname.name.value == alias.name.attr.value:
            return cst.ImportFrom(module=alias.name.value, names=[cst.ImportAlias(name=alias.name.attr)])
        return updated_node

    def leave_EmptyLine(self, original_node: cst.EmptyLine, updated_node: cst.EmptyLine) -> cst.EmptyLine:
        if updated_node.comment is None:
            return updated_node.with_changes(indent=False, whitespace=cst.SimpleWhitespace(""))
        return updated_node


def _assigned(program: SiteProgram) -> set[str]:
    """Names the programs bind other than to an input (``x = mtp_slot_3``)."""
    names = set()
    for source in (program.original, program.rewritten):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and \
                    node.value.id.startswith(SLOT_PREFIX):
                continue
            for target in ast.walk(node) if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.For |
                                                         ast.With | ast.NamedExpr | ast.comprehension) else ():
                if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store):
                    names.add(target.id)
    return names


def _readable(program: SiteProgram) -> dict[str, str]:
    """Parameter names a reader recognises: ``pos_out["logits"]`` -> ``pos_out_logits``; the variable's
    own name unless the program also computes that variable (then its input is ``<name>_input``)."""
    taken = set(re.findall(r"[A-Za-z_]\w*", program.original + program.rewritten))
    computed = _assigned(program)
    names: dict[str, str] = {}
    for slot in program.slots:
        if slot.path.isidentifier() and slot.path not in computed:
            name = slot.path  # the variable itself
        else:
            name = _identifier(slot.path)
            while name in taken or keyword.iskeyword(name) or name[0].isdigit():
                name += "_"
        names[slot.param] = name
        taken.add(name)
    return names
