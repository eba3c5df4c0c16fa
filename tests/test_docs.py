"""The docs site: it builds in strict mode, its examples run, and its generated pages match their sources.

- ``mkdocs build --strict`` (a broken link, a missing page, an unresolved API reference fails);
- every ```` ```python ```` block of every page runs, each page's blocks in order in one namespace
  (a block right after ``<!-- not-run: why -->`` is skipped: it needs files a test does not have);
- the config reference lists exactly the keys the config validator accepts;
- every name in ``jpeft.__all__`` has an API entry;
- the results pages are what ``scripts/results.py`` makes of the records under ``results/``;
- the README stays short, and nothing in it or in the docs speaks of how it was developed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
HAVE_MKDOCS = all(importlib.util.find_spec(m) is not None for m in ("mkdocs", "mkdocstrings", "material"))
NEEDS_MKDOCS = pytest.mark.skipif(not HAVE_MKDOCS, reason="mkdocs not installed: pip install -e '.[docs]'")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the build


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not HAVE_MKDOCS:
        pytest.skip("mkdocs not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "NO_MKDOCS_2_WARNING": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"
    return out


@NEEDS_MKDOCS
def test_docs_build_strict_with_every_page(site):
    for page in ("index.html", "getting-started/index.html", "config-reference/index.html", "results/index.html",
                 "api/index.html", "methods/lora/index.html", "tpu/index.html", "peft-format/index.html",
                 "design/index.html"):
        assert (site / page).is_file(), page
    # the family pages include their results rows from the generated snippets
    assert "ROUGE-1" in (site / "methods" / "lora" / "index.html").read_text(encoding="utf-8")


@NEEDS_MKDOCS
def test_built_config_reference_lists_every_accepted_key(site):
    html = (site / "config-reference" / "index.html").read_text(encoding="utf-8")
    missing = sorted(k for k in _accepted_keys() if f"<code>{k}</code>" not in html)
    assert not missing, f"keys the validator accepts but the built page lacks: {missing}"


@NEEDS_MKDOCS
def test_built_api_reference_has_every_public_name(site):
    import jpeft

    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    missing = [n for n in jpeft.__all__ if f'id="jpeft.{n}"' not in html]
    assert not missing, f"names in jpeft.__all__ without an API entry: {missing}"


# ----------------------------------------------------------------------------- the config reference


def _accepted_keys() -> set[str]:
    """Every key the run-config validator accepts, read from the validator's own defaults."""
    from jpeft.methods import registry
    from train import config, tasks

    defaults = config.to_dict(config.from_dict({}))
    keys = set()
    for name, value in defaults.items():
        if isinstance(value, dict):
            keys |= {f"{name}.{k}" for k in value}
        else:
            keys.add(name)
    for method in registry.names():
        keys |= {f"{method}.{k}" for k in registry.settings(method)}
    for task in tasks.names():
        keys |= {f"{task}.{k}" for k in tasks.settings(task)}
    return keys


def test_config_reference_lists_exactly_the_accepted_keys():
    from train import config

    page = _load("config_reference").render()
    listed = set(re.findall(r"^\| `([^`]+)` \|", page, re.MULTILINE))
    accepted = _accepted_keys()
    assert listed == accepted, (f"on the page only: {sorted(listed - accepted)}; "
                                f"accepted but not on the page: {sorted(accepted - listed)}")
    # the validator really refuses what is not listed, and accepts a listed key as an override
    with pytest.raises(config.ConfigError, match="unknown key"):
        config.from_dict({"train": {"not_a_key": 1}})
    assert config.apply_overrides(config.from_dict({}), ["lora.rank=4"]).lora.rank == 4


def test_config_reference_reads_types_defaults_and_meanings():
    page = _load("config_reference").render()
    assert "| `train.steps` | int | `100` |" in page
    assert "| `lora.rank` | int | `8` | rank `r` of the update" in page
    assert "one of `cosine`, `linear`, `slanted_triangular`" in page  # from the value check itself


def test_config_reference_reads_pydantic_declarations_too():
    """The generator reads pydantic models (descriptions, constraints) as well as dataclasses."""
    pydantic = pytest.importorskip("pydantic")
    from typing import Annotated, Literal

    class Train(pydantic.BaseModel):
        """Loop settings."""

        steps: Annotated[int, pydantic.Field(gt=0, description="optimizer steps")] = 100
        schedule: Literal["cosine", "linear"] = "cosine"

    fields = {name: rest for name, *rest in _load("config_reference")._fields_of(Train)}
    assert fields["steps"][1:] == [100, "optimizer steps; must be > 0"]
    assert fields["schedule"][1] == "cosine"


# ----------------------------------------------------------------------------- the API reference


def test_every_public_name_has_an_api_entry():
    import jpeft

    api = (DOCS / "api.md").read_text(encoding="utf-8")
    entries = set(re.findall(r"^::: jpeft\.(\w+)\s*$", api, re.MULTILINE))
    assert set(jpeft.__all__) <= entries, f"missing: {sorted(set(jpeft.__all__) - entries)}"
    assert len(jpeft.__all__) == len(set(jpeft.__all__))
    for name in jpeft.__all__:
        assert hasattr(jpeft, name), name


# ----------------------------------------------------------------------------- examples


def _python_blocks(page: Path) -> list[tuple[int, str]]:
    """(line, code) of each ```python block not marked ``<!-- not-run: ... -->`` on the line before."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start, body = i, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            skipped = start > 0 and lines[start - 1].strip().startswith("<!-- not-run:")
            if not skipped:
                blocks.append((start + 1, "\n".join(body)))
        i += 1
    return blocks


# Pages whose code blocks are sketches with elisions (``...``), not examples to run, and why.
SKETCHES = {"design.md": "the design note shows the shape of a method and a model family module, with elisions"}
PAGES = sorted(p for p in DOCS.rglob("*.md") if _python_blocks(p) and str(p.relative_to(DOCS)) not in SKETCHES)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_docs_examples_run(page, capsys):
    if "flax" in page.read_text(encoding="utf-8") and importlib.util.find_spec("flax") is None:
        pytest.skip("flax not installed (the test extra installs it)")
    namespace = {"__name__": f"docs_example_{page.stem}"}
    for line, code in _python_blocks(page):
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.relative_to(ROOT)}, the block at line {line}: {err!r}") from err


def test_not_run_blocks_say_why():
    for page in DOCS.rglob("*.md"):
        for marker in re.findall(r"<!-- not-run:(.*?)-->", page.read_text(encoding="utf-8")):
            assert marker.strip(), f"{page}: a not-run marker must say why"


# ----------------------------------------------------------------------------- results


def _committed_records(tmp_path) -> Path:
    """The records git tracks, copied to a folder: a job a user has just run (untracked) changes nothing here."""
    try:
        listed = subprocess.run(["git", "ls-files", "results"], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: which records are the committed ones is unknown")
    if not listed:
        pytest.skip("no committed records")
    out = tmp_path / "committed-records"
    for rel in listed:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes((ROOT / rel).read_bytes())
    return out / "results"


def test_results_pages_are_generated_from_the_records(tmp_path):
    results = _load("results")
    records = _committed_records(tmp_path)
    pages = results.generate(str(records), str(tmp_path / "docs"), figures=False)
    for rel, text in pages.items():
        committed = (DOCS / rel).read_text(encoding="utf-8")
        assert committed == text, f"docs/{rel} is stale: run python scripts/results.py"
    for figure in results.figure_names(*_latest_and_all(records)):
        assert (DOCS / "assets" / "results" / figure).is_file(), figure


def _latest_and_all(folder: Path = ROOT / "results"):
    from train.records import newest, read_records

    records = read_records(str(folder))
    return newest(records), records


def test_every_record_says_where_its_figures_come_from():
    _, records = _latest_and_all()
    assert records
    for record in records:
        for field in ("name", "figures", "command", "commit", "machine", "date"):
            assert record.get(field), (record.get("name"), field)
        assert record["machine"].get("description")


def test_a_new_record_updates_the_pages(tmp_path):
    """Re-running a benchmark changes its table: the newest record of a name wins, history stays."""
    from train.records import write_record

    results = _load("results")
    records = tmp_path / "records"
    write_record("matmul_rates", {"jax_over_torch_matmul_rate": 0.5}, command="old", folder=str(records))
    write_record("matmul_rates", {"jax_over_torch_matmul_rate": 0.75}, command="new", folder=str(records))
    page = results.generate(str(records), str(tmp_path / "docs"), figures=False)["results.md"]
    assert "| `jax_over_torch_matmul_rate` | 0.75 |" in page and "`new`" in page
    assert len(list((records / "matmul_rates").glob("*.json"))) == 2


def test_write_record_writes_nothing_for_bad_input(tmp_path):
    from train.records import write_record

    with pytest.raises(ValueError, match="record name"):
        write_record("../escape", {"x": 1}, folder=str(tmp_path))
    with pytest.raises(TypeError):
        write_record("bad", {"x": object()}, folder=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    path = write_record("ok", {"x": 1.5}, command="c", folder=str(tmp_path), source="s")
    assert json.loads(Path(path).read_text())["source"] == "s"


def test_a_training_job_writes_a_record(tmp_path, monkeypatch):
    """``python -m train`` ends with a record of its summary (the job itself is replaced by a stub here)."""
    from train import __main__ as cli
    from train import run

    monkeypatch.setenv("JPEFT_RESULTS_DIR", str(tmp_path))
    summary = {"kind": "summary", "rouge": [{"model": "lora r=8", "rouge1": 30.0}], "timings_s": {}}
    monkeypatch.setattr(run, "run", lambda config: summary)
    assert cli.main(["--config", str(ROOT / "configs" / "smollm2_bbc_lora.yaml"), f"out_dir={tmp_path}"]) == 0
    (path,) = (tmp_path / "train" / "smollm2_bbc_lora").glob("*.json")
    record = json.loads(path.read_text())
    assert record["figures"]["rouge"] == summary["rouge"] and record["figures"]["method"] == "lora"
    assert record["command"].startswith("python") and record["commit"]


# ----------------------------------------------------------------------------- the README and the wording


def test_readme_is_short_and_keeps_the_two_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    assert "bash scripts/setup.sh && .venv/bin/python -m train --config configs/smollm2_bbc_lora.yaml" in readme
    assert ".venv/bin/python -m pytest -q" in readme
    assert "pip install -e '.[docs]'" in readme and "mkdocs build --strict" in readme


def test_docs_speak_of_the_project_not_of_its_development():
    pattern = re.compile(r"this session|previous session|later session|\bstop [0-9]+|issue [0-9]+", re.IGNORECASE)
    for path in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        found = pattern.findall(path.read_text(encoding="utf-8"))
        assert not found, f"{path.relative_to(ROOT)}: {found}"
