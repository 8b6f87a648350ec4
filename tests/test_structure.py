"""The shape of the code and of a run, checked: imports point down, every stage keeps the contract,
each default is stated once, a config error is one line naming every bad key, and a step that
reads a column nothing writes stops the run before any work."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from core.errors import ConfigError
from pipeline.cli import main
from pipeline.config import DEFAULT_CONFIG_PATH, Config, config_from_dict, load_config
from pipeline.dag import INPUT_COLUMNS, POLICY, SAMPLE, STEPS, Step, check_reads, step
from stages.base import BatchStage, PoolStage, ShardStage, Stage, StageContractError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "manifests", "models", "stages", "sources", "training", "pipeline")
# Which of our packages each package may import (imports point down: models <- stages <- pipeline).
ALLOWED = {
    "core": set(),
    "manifests": {"core"},
    "models": {"core", "manifests"},
    "stages": {"core", "manifests", "models"},
    "sources": {"core", "manifests", "stages"},  # a dataset states its download settings
    # the ablation drives a curate run; training from a selection reads download shards as resharding does
    "training": {"core", "manifests", "models", "stages", "sources", "pipeline"},
    # never training, not even inside a function: its sections are pipeline/training_config.py's and its
    # subcommands come in by entry point (training/cli.py)
    "pipeline": {"core", "manifests", "models", "stages", "sources"},
}


def _imports(path: Path) -> set[str]:
    """Top-level package names of ours that a module imports, lazy and TYPE_CHECKING imports included,
    and modules named as strings to ``importlib.import_module`` / ``__import__``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.add(node.args[0].value.split(".")[0])
    return found & set(PACKAGES)


def test_imports_point_down():
    arrows: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for target in _imports(path) - {package}:
                arrows[package].add(target)
                assert target in ALLOWED[package], f"{path.relative_to(ROOT)} imports {target}: {package} must not"
    assert not arrows["models"] & {"stages", "pipeline"} and not arrows["stages"] & {"pipeline", "training"}
    assert "training" not in arrows["pipeline"] and "pipeline" in arrows["training"]  # one way between the two
    assert arrows["pipeline"] >= {"stages", "manifests"}  # the check sees real imports


def test_a_lazy_or_dynamic_pipeline_to_training_import_is_caught(tmp_path):
    """The scan sees imports inside functions, under TYPE_CHECKING and by name, not only at the top."""
    module = tmp_path / "m.py"
    for body in ("def f():\n    from training.ablation import run_ablation\n",
                 "if TYPE_CHECKING:\n    import training.train\n",
                 "import importlib\nimportlib.import_module('training.cli')\n",
                 "__import__('training')\n"):
        module.write_text(body)
        assert _imports(module) == {"training"}, body


def test_importing_all_of_pipeline_loads_no_training_module():
    """At run time too: every pipeline module imported, and its config built, with training nowhere in
    sys.modules (transitive imports included)."""
    import subprocess
    import sys

    modules = sorted(f"pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py") if p.stem != "__main__")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "from pipeline.config import load_config\nload_config()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'training'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_training_commands_are_registered_by_entry_point(capsys):
    """`python -m pipeline train|evaluate|ablation` still work: training/cli.py adds them through the
    clip_curation.commands entry point (pyproject.toml), which pipeline/cli.py loads without naming."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        group = tomllib.load(f)["project"]["entry-points"]["clip_curation.commands"]
    assert group == {"training": "training.cli:add_commands"}
    for command in ("train", "evaluate", "ablation"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0 and f"usage: python -m pipeline {command}" in capsys.readouterr().out


def test_every_stage_declares_the_contract():
    stages = [s.stage for s in STEPS if s.stage is not None]
    assert {s.name for s in stages} >= {"download", "ocr", "parrot", "clip_score", "dedup", "dup_group", "filter", "reshard"}
    for stage in stages:
        assert issubclass(stage, (BatchStage, ShardStage, PoolStage)), stage
        assert stage.output_schema.names[0] == "uid" or stage.name == "reshard"
        assert stage.status_column is None or stage.status_column in stage.output_schema.names
        assert isinstance(stage.reads, tuple)
    kinds = {s.name: s.kind for s in STEPS}
    assert [n for n, k in kinds.items() if k == SAMPLE] == ["ocr", "parrot", "caption", "clip_score", "dedup", "faces"]


def test_a_stage_that_drops_a_column_is_named():
    stage = step("parrot").stage
    with pytest.raises(StageContractError, match="missing column.*parrot_score"):
        stage.check_output([c for c in stage.output_schema.names if c != "parrot_score"])
    with pytest.raises(StageContractError, match="undeclared column.*surprise"):
        stage.check_output([*stage.output_schema.names, "surprise"])
    stage.check_output(stage.output_schema.names)


# --- configuration ------------------------------------------------------------------------------


def test_default_toml_states_the_same_defaults_as_the_classes():
    """Each default is written once, in its stage's dataclass; default.toml documents every key
    with the same value, and this keeps the two from drifting."""
    with open(DEFAULT_CONFIG_PATH, "rb") as f:
        data = tomllib.load(f)
    shipped = load_config()
    plain = Config()
    for section in ("download", "ocr", "parrot", "caption", "clip", "dedup", "faces", "reshard", "train", "ablation",
                    "reading", "decontaminate", "watchdog"):
        cls = type(getattr(plain, section))
        assert set(data[section]) == {f for f in cls.__dataclass_fields__}, f"[{section}] must list every key once"
        assert getattr(shipped, section) == getattr(plain, section), f"[{section}] in default.toml differs from {cls.__name__}"


@pytest.mark.parametrize(
    "toml, expected",
    [
        ("download = 3", "download must be a table, got 3"),
        ("datasets = 3", "datasets must be a table, got 3"),
        ("[policies]\nx = 3", "policies.x must be a table, got 3"),
        ("[download]\nshard_size = 'ten'", "download.shard_size must be int, got 'ten'"),
        ("[ocr]\nbatch_size = true", "ocr.batch_size must be int, got True"),
        ("[clip]\nmodle = 'x'", "unknown key 'clip.modle' (known: batch_size"),
        ("[clips]\nmodel = 'x'", "unknown section 'clips'"),
        ("[train]\ngpus = 1.0", "unknown key 'train.gpus'"),  # TrainStage and its keys are gone
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, toml, expected):
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert main(["curate", "--config", str(path), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    printed = capsys.readouterr().err
    assert printed.count("\n") == 1 and expected in printed and "Traceback" not in printed
    assert not (tmp_path / "out").exists()


def test_every_config_error_is_listed_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[download]\nshard_size = 'ten'\nthread_count = 0.5\n[ocr]\nengine = 3\nspeed = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    for key in ("download.shard_size", "download.thread_count", "ocr.engine", "ocr.speed"):
        assert key in message, message
    path.write_text("[download]\nshard_size = 0\ntimeout_s = 0\n[ocr]\nengine = 'tesseract'\n")  # types fine, values not
    message = str(pytest.raises(ConfigError, load_config, path).value)
    for text in ("download.shard_size must be >= 1", "download.timeout_s must be > 0", "ocr.engine"):
        assert text in message, message


def test_config_accepts_an_int_for_a_float_and_lists_for_tuples():
    config = config_from_dict({"download": {"timeout_s": 3, "allow_networks": ["10.0.0.0/8"]},
                               "policies": {"all": {"rules": {"downloaded": "true"}}}, "ablation": {"policies": ["all"]}})
    assert config.download.timeout_s == 3.0 and config.download.allow_networks == ("10.0.0.0/8",)


# --- reads checked before any work --------------------------------------------------------------


def test_a_policy_naming_a_column_nothing_writes_stops_the_run_at_start(tmp_path, capsys):
    path = tmp_path / "typo.toml"
    path.write_text('[policies.typo]\nrules = { low = "parot_score < 0.5" }\n')
    out = tmp_path / "out"
    assert main(["curate", "--config", str(path), "--output", str(out), "--policies", "all,typo", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "step 'filter' (policy 'typo') reads 'parot_score', which no earlier step writes" in err
    assert not out.exists()  # nothing downloaded, nothing written


def test_a_stage_before_the_one_it_reads_from_is_refused():
    config = load_config()
    order = tuple(s for s in STEPS if s.name != "ocr")
    order = order[:1] + (step("ocr"),) + order[1:]
    check_reads(config, ("all",), order)  # download, ocr, parrot, ...: fine
    swapped = (step("download"), step("parrot"), step("ocr"))
    with pytest.raises(ConfigError, match="step 'parrot' reads 'ocr_status', 'ocr_text', 'texts'"):
        check_reads(config, ("all",), swapped)


def test_every_shipped_step_reads_only_what_earlier_steps_write():
    config = load_config()
    # a policy a dataset adds only when its list has the column (laion-sim: LAION's similarity)
    conditional = {c for d in config.datasets.values() for c in d.policies_if_column.values()}
    check_reads(config, tuple(config.policies), source_columns=conditional)
    with pytest.raises(ConfigError, match="'similarity', which no earlier step writes"):
        check_reads(config, ("laion-sim",))
    available = set(INPUT_COLUMNS)
    for s in STEPS:
        if s.kind != POLICY:
            assert set(s.reads(config)) <= available, s.name
        available |= set(s.writes())
    assert {"phash", "dup_group", "parrot_score", "clip_score_masked", "kept"} <= available


def test_dag_table_in_curate_help(capsys):
    with pytest.raises(SystemExit):
        main(["curate", "--help"])
    text = capsys.readouterr().out
    for name in ("download", "ocr", "parrot", "clip_score", "dedup", "dup_group", "filter", "reshard", "report"):
        assert f"\n  {name} " in text, name


def test_sizes_json_and_shard_names_have_one_definition():
    """The on-disk names are defined once (manifests/store.py) and used everywhere else."""
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            if path.name != "store.py" and ('"sizes.json"' in text or "def shard_name" in text):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
    assert json.dumps("sizes.json") in (ROOT / "manifests" / "store.py").read_text()


def test_stage_kinds_are_the_contract_ones():
    assert all(issubclass(k, Stage) for k in (BatchStage, ShardStage, PoolStage))
    assert isinstance(step("filter"), Step)


@pytest.mark.parametrize("name", ["000012.jpg", "000012.tar.gz", "dir.x/000012.json", "a/b/c.d.e", "noext", "dir/", ".hidden"])
def test_tar_key_is_webdatasets_rule(name):
    from webdataset.tariterators import base_plus_ext

    from manifests.store import tar_key

    key, ext = base_plus_ext(name)
    assert tar_key(name) == ((key, ext) if key is not None else (name, ""))


def test_policy_params_are_named_once_and_checked(tmp_path):
    config = load_config()
    top = config.policy("clip-score-top")
    assert top.params == {"keep_fraction": 0.3, "score": "clip_score"} and "{keep_fraction}" in top.rules["top_fraction"]
    assert top.rendered_rules()["top_fraction"] == '"clip_score" >= quantile_cont("clip_score", 1 - 0.3) over ()'
    path = tmp_path / "s.toml"  # a text param names a column: the pool's own score ranks
    path.write_text('[policies.clip-score-top]\nparams = { score = "similarity" }\n')
    ranked = load_config(path).policy("clip-score-top")
    assert ranked.params == {"keep_fraction": 0.3, "score": "similarity"} and '"similarity" >=' in ranked.rendered_rules()["top_fraction"]
    path = tmp_path / "p.toml"
    path.write_text('[policies.clip-score-top]\nparams = { keep_fraction = 0.1 }\n')
    assert "1 - 0.1" in load_config(path).policy("clip-score-top").rendered_rules()["top_fraction"]
    path.write_text('[policies.x]\nrules = { a = "clip_score > {floor}" }\n')
    with pytest.raises(ConfigError, match=r"policies.x.rules names \{floor\}, which is not in policies.x.params"):
        load_config(path)
    path.write_text('[policies.x]\nrules = { a = "true" }\nparams = { unused = 1 }\n')
    with pytest.raises(ConfigError, match="policies.x.params.unused is not used by any rule"):
        load_config(path)
    path.write_text('[policies.x]\nrules = { a = "clip_score > {floor}" }\nparams = { floor = true }\n')
    with pytest.raises(ConfigError, match="policies.x.params.floor.float must be float"):
        load_config(path)


def test_make_compiles_every_package_that_pip_installs():
    """`make`'s bytecode step names each package the editable install ships (pyproject's list):
    one left out would be compiled again by every Ray worker at every start where
    PYTHONDONTWRITEBYTECODE is set."""
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if "-m compileall" in x)
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert set(line.split("-q", 1)[1].split()) == {p.rstrip("*") for p in include} == set(PACKAGES)


def test_checking_the_policies_does_not_import_pandas():
    """``curate`` parses every policy's rules while it plans, before Ray starts: DuckDB's Python
    binding imports pandas (0.3 s) for a query with ``?`` parameters, so the parser inlines its text."""
    code = ("import sys\n"
            "from pipeline.config import load_config\n"
            "from stages.filter import referenced_columns\n"
            "config = load_config()\n"
            "columns = {p: referenced_columns(config.policy(p)) for p in config.policies}\n"
            "print(len(columns['no-text']) > 0, 'pandas' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True False", done.stdout + done.stderr[-2000:]
