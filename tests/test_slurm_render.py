"""Rendering of the Slurm job scripts: golden files, bash syntax, hostile values.

No Slurm needed: these run everywhere. The scripts themselves run on the real test
cluster in tests/test_slurm_jobs.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.config import config_from_dict
from pipeline.errors import ConfigError
from pipeline.slurm import TEMPLATES, prepare, render
from tests.conftest import run_cli

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden" / "slurm"
HOSTILE = "a b'c\"d $(touch PWNED) `touch PWNED2`; touch PWNED3 \\ e\nf"


def golden_config(**slurm: object) -> dict:
    return {
        "name": "era5-unet",
        "runs_dir": "runs",
        "data": {"sources": [{"path": "data/raw/*.nc"}], "variables": ["t2m"],
                 "splits": {"train": ["2000-01-01", "2000-01-10"],
                            "val": ["2000-01-11", "2000-01-12"],
                            "test": ["2000-01-13", "2000-01-14"]},
                 "store": "data/era5.zarr"},
        "slurm": {"partition": "gpu", "account": "climate", "nodes": 4, "gpus_per_node": 4,
                  "cpus_per_task": 32, "time": "12:00:00", "mem": "200G",
                  "modules": ["cuda/12.4", "nccl"], "setup": ["source /opt/venvs/ml/bin/activate"],
                  "extra_directives": ["--qos=normal", "--constraint=a100"],
                  "command": "python -m pipeline", "preprocess_parts": 8, **slurm},
    }


@pytest.mark.parametrize("template", TEMPLATES)
def test_rendered_scripts_match_the_golden_files(template: str) -> None:
    cfg = config_from_dict(golden_config())
    text = render(template, cfg, "configs/era5.yaml", ["train.lr=0.001"], workdir="/project")
    golden = GOLDEN / f"{template}.sbatch"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text(), "rendering changed; rerun with UPDATE_GOLDEN=1 to accept"
    assert text == render(template, cfg, "configs/era5.yaml", ["train.lr=0.001"],
                          workdir="/project"), "rendering is not deterministic"


@pytest.mark.parametrize("template", TEMPLATES)
def test_every_rendered_script_is_valid_bash(template: str, tmp_path: Path) -> None:
    for cfg in (golden_config(), golden_config(gpus_per_node=0, nodes=1, modules=[], setup=[],
                                               extra_directives=[], partition=None)):
        script = tmp_path / f"{template}.sh"
        script.write_text(render(template, config_from_dict(cfg), "c.yaml", [], workdir=tmp_path))
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_directives_are_sorted_and_follow_the_config() -> None:
    text = render("train", config_from_dict(golden_config()), "c.yaml", [], workdir="/p")
    lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert lines == sorted(lines)
    for expected in ("--nodes=4", "--gpus-per-node=4", "--cpus-per-task=32", "--requeue",
                     "--signal=B:USR1@180", "--partition=gpu", "--account=climate",
                     "--qos=normal", "--constraint=a100", "--ntasks-per-node=1"):
        assert f"#SBATCH {expected}" in lines
    cpu = render("train", config_from_dict(golden_config(gpus_per_node=0)), "c.yaml", [],
                 workdir="/p")
    assert "--gpus-per-node" not in cpu
    body = text.split("set -euo pipefail", 1)[1]
    assert body.index("module load cuda/12.4") < body.index("source /opt/venvs/ml") \
        < body.index("exec python -m pipeline train")


def test_hostile_paths_and_overrides_cannot_run_anything(tmp_path: Path) -> None:
    """Quotes, spaces, $(), backticks, ; and newlines in every path and argument of the
    shell body: the script runs (with a stand-in command) and creates no file."""
    work = tmp_path / "work"
    work.mkdir()
    cfg = golden_config(command="echo", modules=[], setup=[], log_dir=str(tmp_path / "logs"))
    cfg["data"]["store"] = HOSTILE
    hostile_dir = work / HOSTILE
    hostile_dir.mkdir()
    config_path = hostile_dir / "c.yaml"
    for template in TEMPLATES:
        text = render(template, config_from_dict(cfg), config_path, [f"data.store={HOSTILE}"],
                      workdir=work)
        script = tmp_path / f"{template}.sh"
        script.write_text(text)
        env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "PATH": os.environ["PATH"]}
        # stand-ins for the Slurm commands the retrain script calls
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        for tool in ("squeue", "sbatch"):
            (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
            (bin_dir / tool).chmod(0o755)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
        out = subprocess.run(["bash", str(script)], cwd=work, capture_output=True, text=True,
                             env=env, timeout=30)
        assert out.returncode == 0, out.stderr
        if template == "demo_data":  # takes no config: the demo's own folder and size
            assert "demo-data data/demo/raw --size small" in out.stdout
            continue
        assert str(config_path) in out.stdout  # the path arrived as one intact argument
        assert HOSTILE in out.stdout
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))


def test_a_hostile_value_on_an_sbatch_line_is_refused(tmp_path: Path) -> None:
    cfg = golden_config()
    cfg["runs_dir"] = str(tmp_path / "runs\n#SBATCH --wrap=touch PWNED")
    with pytest.raises(ConfigError, match="newline"):
        render("train", config_from_dict(cfg), "c.yaml", [], workdir=tmp_path)
    for bad in ({"partition": "gpu\necho x"}, {"extra_directives": ["--qos=a\ntouch x"]},
                {"extra_directives": ["echo x"]}, {"modules": ["a;b c"]}, {"time": "1:00;x"}):
        with pytest.raises(ConfigError):
            config_from_dict(golden_config(**bad))


def test_a_path_with_spaces_is_quoted_on_sbatch_lines(tmp_path: Path) -> None:
    cfg = golden_config(log_dir=str(tmp_path / "my logs"))
    text = render("evaluate", config_from_dict(cfg), "c.yaml", [], workdir=tmp_path / "a dir")
    assert f'#SBATCH --output="{tmp_path}/my logs/%x-%j.out"' in text
    assert f'#SBATCH --chdir="{tmp_path}/a dir"' in text


def test_the_chain_is_ordered_and_the_dry_run_submits_nothing(tmp_path: Path) -> None:
    cfg = config_from_dict(golden_config(log_dir=str(tmp_path / "logs")))
    stages = [job.stage for job in prepare(cfg, "c.yaml", [], ["evaluate", "preprocess"])]
    assert stages == ["preprocess", "finalise", "evaluate"]
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(golden_config(log_dir=str(tmp_path / "logs"))))
    out = run_cli("slurm", "submit", str(config), "--dry-run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("would submit") == 4
    assert "--dependency=afterok:<finalise-id>" in out.stdout
    assert not (tmp_path / "logs").exists()
    bad = run_cli("slurm", "submit", str(config), "--stages", "train,deploy", cwd=tmp_path)
    assert bad.returncode == 2 and "deploy" in bad.stderr
    bad = run_cli("slurm", "render", "nonsense", str(config), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown Slurm template")
    # off a Slurm login node: a one-line error, and no script written
    bare = tmp_path / "bin"  # a PATH without sbatch
    bare.mkdir()
    bad = run_cli("slurm", "submit", str(config), cwd=tmp_path, env={"PATH": str(bare)})
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("error: sbatch not found (run this on a Slurm login node")
    assert len(bad.stderr.splitlines()) == 1
    assert not (tmp_path / "logs").exists()


def test_the_templates_are_the_top_level_slurm_folder() -> None:
    """`pipeline slurm` renders the files of slurm/ that users read and adapt: every
    template there is one it renders, and its README names each."""
    from pipeline.slurm import template_dir

    top = Path(__file__).parents[1] / "slurm"
    assert template_dir().resolve() == top.resolve()
    names = {p.name.removesuffix(".sh.j2") for p in top.glob("*.sh.j2")} - {"_header"}
    assert names == set(TEMPLATES)
    readme = (top / "README.md").read_text()
    assert all(f"`{name}.sh.j2`" in readme for name in TEMPLATES)


def test_a_demo_config_chain_writes_the_demo_data_first(tmp_path: Path) -> None:
    """As `pipeline run` does: a config that reads data/demo/raw gets a demo-data job
    before preprocessing, for the months its splits need; other configs do not."""
    from pipeline.config import load_config

    demo = load_config(Path(__file__).parents[1] / "configs" / "demo.yaml")
    jobs = prepare(demo, "configs/demo.yaml", [], ["preprocess", "train"], workdir=tmp_path)
    assert [job.stage for job in jobs] == ["demo_data", "preprocess", "finalise", "train"]
    assert "demo-data data/demo/raw --size small --months 6" in jobs[0].script
    assert [j.stage for j in prepare(demo, "c.yaml", [], ["train"], workdir=tmp_path)] == ["train"]
    other = config_from_dict(golden_config())
    assert prepare(other, "c.yaml", [], ["preprocess"])[0].stage == "preprocess"


@pytest.mark.integration
def test_an_installed_wheel_renders_every_template(tmp_path: Path) -> None:
    """`pip wheel` packs slurm/ into the package: in a fresh environment that holds only
    the wheel (its dependencies borrowed from this one, the checkout out of reach),
    `pipeline slurm render` renders each template exactly as the checkout does."""
    import sys
    import sysconfig

    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(tmp_path / "dist"), str(root)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    wheel = next((tmp_path / "dist").glob("pipeline-*.whl"))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True,
                   timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig."
                                "get_paths()['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    # the dependencies, as a plain path: the editable install's finder is not loaded
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(golden_config()))
    for template in TEMPLATES:
        got = subprocess.run([str(python), "-m", "pipeline", "slurm", "render", template,
                              str(config)], capture_output=True, text=True, cwd=tmp_path,
                             timeout=120)
        assert got.returncode == 0, got.stderr
        here = run_cli("slurm", "render", template, str(config), cwd=tmp_path)
        assert got.stdout == here.stdout and got.stdout.startswith("#!/bin/bash"), template
    where = subprocess.run([str(python), "-c", "import pipeline.slurm as s; print(s.__file__, "
                            "s.template_dir())"], capture_output=True, text=True, check=True,
                           cwd=tmp_path).stdout
    assert str(root) not in where and str(site) in where, where
