"""tools/: scripts around the library, run as a user runs them."""

import json
import subprocess
import sys

import pytest

from ds_distill.config.deepspeed import TEACHER_PLACEMENTS
from tests.conftest import REPO, subprocess_env


def prepare_wmt(*args):
    return subprocess.run(
        [sys.executable, "tools/prepare_wmt.py", *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True
    )


def test_prepare_wmt_pairs_text_corpora_and_sgml_test_sets(tmp_path):
    raw = tmp_path / "raw"
    (raw / "training").mkdir(parents=True)
    (raw / "dev").mkdir()
    (raw / "training" / "europarl.es-en.en").write_text("Hello .\n\nThe house is red .\n")
    (raw / "training" / "europarl.es-en.es").write_text("Hola .\nVacío\nLa casa es roja .\n")
    (raw / "dev" / "newstest2013-src.en.sgm").write_text(
        '<srcset><doc><seg id="1">Tom &amp; Ann</seg>\n<seg id="2">It&apos;s late.</seg></doc></srcset>'
    )
    (raw / "dev" / "newstest2013-ref.es.sgm").write_text(
        '<refset><seg id="1">Tom y Ana</seg><seg id="2">Es tarde.</seg>'
    )
    result = prepare_wmt(
        "text", f"--raw_dir={raw}", "--source=en", "--target=es", f"--output_dir={tmp_path / 'out'}",
        "--train=training/europarl.es-en", "--validation=dev/newstest2013",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wrote 2 training and 2 validation pairs" in result.stdout
    rows = [json.loads(line)["translation"] for line in open(tmp_path / "out" / "train.jsonl")]
    assert rows == [{"en": "Hello .", "es": "Hola ."}, {"en": "The house is red .", "es": "La casa es roja ."}]
    rows = [json.loads(line)["translation"] for line in open(tmp_path / "out" / "validation.jsonl")]
    assert rows == [{"en": "Tom & Ann", "es": "Tom y Ana"}, {"en": "It's late.", "es": "Es tarde."}]


def test_prepare_wmt_refuses_sides_that_are_not_aligned(tmp_path):
    (tmp_path / "c.en").write_text("one\ntwo\n")
    (tmp_path / "c.es").write_text("uno\n")
    result = prepare_wmt(
        "text", f"--raw_dir={tmp_path}", "--source=en", "--target=es", f"--output_dir={tmp_path / 'out'}",
        "--train=c", "--validation=c",
    )  # fmt: skip
    assert result.returncode != 0
    assert "has 2 sentences and" in result.stderr and "must be line-aligned" in result.stderr
    assert not list((tmp_path / "out").glob("train.jsonl*"))  # no file, not even a partial one


def fake_deepspeed(tmp_path):
    """A `deepspeed` on PATH that records its arguments instead of launching."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "deepspeed").write_text('#!/usr/bin/env bash\necho "$@" >> "$(dirname "$0")/calls"\n')
    (bin_dir / "deepspeed").chmod(0o755)
    return bin_dir


def run_script(script, tmp_path, bin_dir, **env):
    import os

    environment = {
        **subprocess_env(),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "OUTPUT": str(tmp_path / "out"),
        **env,
    }
    # from tmp_path: what the script writes beside its run (OUTPUT.log, runs/) stays out of the repository
    return subprocess.run(["bash", REPO / script, "--x.y=1"], cwd=tmp_path, env=environment, capture_output=True,
                          text=True)  # fmt: skip


def test_launch_scripts_pick_a_free_master_port_or_take_master_port(tmp_path):
    import py_compile

    bin_dir = fake_deepspeed(tmp_path)
    for script, verb in (("launch_scripts/flan_t5_3b.sh", "distill --recipe=flan_t5_3b_145m"),
                         ("launch_scripts/flan_t5_3b_chain.sh", "chain --recipe=flan_t5_3b_chain")):  # fmt: skip
        py_compile.compile(str(REPO / script), doraise=True)  # `deepspeed SCRIPT` runs it as python
        assert run_script(script, tmp_path, bin_dir).returncode == 0
        assert run_script(script, tmp_path, bin_dir).returncode == 0
        assert run_script(script, tmp_path, bin_dir, MASTER_PORT="29777").returncode == 0
        calls = (bin_dir / "calls").read_text().splitlines()[-3:]
        ports = [call.split("--master_port ")[1].split()[0] for call in calls]
        assert ports[0] != ports[1] and ports[2] == "29777"  # two jobs on one machine do not collide
        assert all(f"--module ds_distill {verb}" in call and call.endswith("--x.y=1") for call in calls)
    for placement, json_file in TEACHER_PLACEMENTS.items():  # the bash side and the python side agree
        assert run_script("launch_scripts/flan_t5_3b.sh", tmp_path, bin_dir, TEACHER=placement).returncode == 0
        assert f"--teacher.deepspeed_config={json_file} " in (bin_dir / "calls").read_text().splitlines()[-1]
    assert run_script("launch_scripts/flan_t5_3b.sh", tmp_path, bin_dir, TEACHER="gpu").returncode == 2


def test_the_tiny_chain_script_starts_the_launcher_on_itself_with_two_cpu_ranks(tmp_path):
    bin_dir = fake_deepspeed(tmp_path)
    assert run_script("launch_scripts/tiny_cpu.sh", tmp_path, bin_dir, OUTPUT_DIR=str(tmp_path / "c")).returncode == 0
    call = (bin_dir / "calls").read_text().splitlines()[-1]
    assert call.startswith("--master_port ") and "--num_gpus 2 " in call
    assert call.endswith(f"{REPO / 'launch_scripts/tiny_cpu.sh'} --x.y=1")


@pytest.mark.parametrize(
    ("script", "mistyped"),
    [("launch_scripts/flan_t5_3b.sh", "--train.max_stepz=1"),
     ("launch_scripts/flan_t5_3b_chain.sh", "--defaults.train.max_stepz=1"),
     ("launch_scripts/tiny_cpu.sh", "--defaults.train.max_stepz=1")],
)  # fmt: skip
def test_each_scripts_python_side_hands_over_to_ds_distill(tmp_path, script, mistyped):
    """What `deepspeed SCRIPT` runs on each rank (the file, read by python) reaches ds-distill, which refuses a
    mistyped key in one line before any weights load."""
    env = {**subprocess_env(), "OUTPUT": str(tmp_path / "out"), "OUTPUT_DIR": str(tmp_path / "out")}
    result = subprocess.run([sys.executable, REPO / script, mistyped], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unknown key" in errors[0] and "Did you mean 'max_steps'?" in errors[0]
    assert "Traceback" not in result.stderr


def test_launch_scripts_take_a_config_or_a_recipe_and_both_sides_build_the_same_run(tmp_path):
    from ds_distill.cli.scripts import run_args

    bin_dir = fake_deepspeed(tmp_path)
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  output_dir: runs/mine\n")
    chain = tmp_path / "chain.yaml"
    chain.write_text("output_dir: runs/my_chain\nstages: []\n")
    scripts = {  # script: (verb, its default recipe, a config of that verb)
        "launch_scripts/flan_t5_3b.sh": ("distill", "flan_t5_3b_145m", run),
        "launch_scripts/flan_t5_3b_chain.sh": ("chain", "flan_t5_3b_chain", chain),
        "launch_scripts/multinode_hostfile.sh": ("distill", "flan_t5_3b_145m", run),
    }
    for script, (verb, recipe, config) in scripts.items():
        shipped = str(REPO / "ds_distill" / "recipes" / f"{recipe}.yaml")  # its paths: the working directory's
        for env in ({}, {"ZERO_STAGE": "3", "TEACHER": "cpu"}, {"CONFIG": str(config)}, {"CONFIG": shipped},
                    {"CONFIG": str(config), "ZERO_STAGE": "3"}, {"RECIPE": "flan_t5_3b_425m", "OUTPUT": "x"}):  # fmt: skip
            env = {"HOSTFILE": "hosts", **env}
            result = run_script(script, tmp_path, bin_dir, **{"OUTPUT": "", **env})
            assert result.returncode == 0, result.stderr
            call = (bin_dir / "calls").read_text().splitlines()[-1]
            bash_side = call.split(f"--module ds_distill {verb} ")[1].removesuffix(" --x.y=1").split()
            assert bash_side == run_args(verb, recipe, env), (script, env)
        assert "--hostfile hosts" in call
    distill = run_args("distill", "r", {"CONFIG": str(run)})
    # the file as written; its output directory read from its folder
    assert distill == [f"--config={run}", f"--train.output_dir={tmp_path}/runs/mine", "--resume=auto"]
    assert run_args("chain", "r", {"CONFIG": str(chain)})[-1] == f"--output_dir={tmp_path}/runs/my_chain"
    shipped = run_args("distill", "r", {"CONFIG": "ds_distill/recipes/flan_t5_3b_145m.yaml"})
    assert shipped[1] == "--train.output_dir=runs/flan_t5_3b_145m"
    assert run_args("distill", "r", {})[1:] == ["--student.deepspeed_config=ds_configs/student_zero2.json",
                                                "--teacher.deepspeed_config=ds_configs/teacher_replicated_bf16.json",
                                                "--train.output_dir=runs/r", "--resume=auto"]  # fmt: skip
    both = run_script("launch_scripts/multinode_hostfile.sh", tmp_path, bin_dir, HOSTFILE="h", CONFIG=str(run),
                      RECIPE="flan_t5_3b_145m")  # fmt: skip
    assert both.returncode == 2 and "set CONFIG or RECIPE, not both" in both.stderr
    missing = run_script("launch_scripts/multinode_hostfile.sh", tmp_path, bin_dir, HOSTFILE="h", CONFIG="nope.yaml")
    assert missing.returncode == 2 and "CONFIG=nope.yaml: no such file" in missing.stderr
