"""Two `accelerate launch` invocations as two machines on loopback (num_machines=2, machine_rank 0 and 1,
one CPU process each) train and evaluate together, and match a 2-process single-node run."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, child_env, free_port, launch, read_log, write_tiny_recipe


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, tiny_model_dir):
    """The recipe, and its 2-process single-node run: the reference of every two-node template."""
    root = tmp_path_factory.mktemp("one-node")
    recipe = write_tiny_recipe(root, tiny_model_dir, train={"max_steps": 5, "grad_accum": 2, "micro_batch_size": 2})
    launch("train.py", ["--config", recipe, "--output_dir", root / "single"], nproc=2)
    return recipe, root / "single"


@pytest.mark.parametrize("template", ["multi_node_ddp", "multi_node_zero3", "multi_node_fsdp2"])
def test_two_nodes_on_loopback_match_one_node(tmp_path, one_node, template):
    recipe, single = one_node
    multi = tmp_path / "multi"
    port = free_port()
    nodes = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / f"accelerate_configs/{template}.yaml"), "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               str(ROOT / "train.py"), "--config", str(recipe), "--output_dir", str(multi)]
        nodes.append(subprocess.Popen(cmd, cwd=ROOT, env=child_env(1), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, err[-3000:]
    assert "held-out metrics" in outs[0][0]  # the global main process (node 0) reports
    facts = yaml.safe_load((multi / "config.yaml").read_text())["run"]
    assert facts["world_size"] == 2
    ranks = json.loads((multi / "ranks.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    la, lb = [r["loss"] for r in read_log(single)], [r["loss"] for r in read_log(multi)]
    assert la == pytest.approx(lb, abs=1e-5)  # ZeRO-3 / FSDP2 only reorder the gradient sums (see test_deepspeed)
    ma = json.loads((single / "eval/metrics.json").read_text())
    mb = json.loads((multi / "eval/metrics.json").read_text())
    for k in ("accuracy", "f1_weighted", "num_examples"):
        assert ma[k] == mb[k]
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-5)
