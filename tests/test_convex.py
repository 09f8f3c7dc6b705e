"""The convex experiment: the curvature of logistic regression against its closed form, a short run."""

import json
from pathlib import Path

import pytest
import torch

from scaling_abs import curvature
from scaling_abs.cli import main as cli_main
from scaling_abs.convex import ConvexConfig, UnitRowLinear, _Problem, run_method, table
from scaling_abs.data import FASHION_MNIST_DIR

needs_fmnist = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed"
)


def synthetic_problem(n=300, d=12, l2=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] > x[:, 1]).long()
    cfg = ConvexConfig(l2=l2, iterations=40, batch_size=20, max_batch_size=160, check_every=40, kappa=2)
    return _Problem(cfg, x, y, x[:50], y[:50])


def test_logistic_regression_eigenvalue_matches_the_closed_form():
    # H = [Z 1]^T diag(p (1 - p)) [Z 1] / n + l2 on the weights, Z the unit-length rows.
    pb = synthetic_problem()
    model = UnitRowLinear(pb.x.shape[1]).double()
    with torch.no_grad():
        model.linear.weight.copy_(torch.linspace(-1, 1, pb.x.shape[1], dtype=torch.float64))
        model.linear.bias.fill_(0.3)
    z = pb.x / pb.x.norm(dim=1, keepdim=True)
    a = torch.cat([z, torch.ones(len(z), 1, dtype=torch.float64)], 1)
    p = torch.sigmoid(model(pb.x))
    h = a.T @ (a * (p * (1 - p))[:, None]) / len(z)
    h[:-1, :-1] += pb.cfg.l2 * torch.eye(z.shape[1], dtype=torch.float64)
    exact = torch.linalg.eigvalsh(h)[-1].item()
    res = curvature.top_eigenvalue(model, pb.loss, pb.hessian_batches, max_iter=200, tol=1e-10)
    assert res.eigenvalue == pytest.approx(exact, rel=1e-6)


def test_abs_grows_its_batch_and_sgd_does_not():
    pb = synthetic_problem()
    sgd = run_method(pb, "sgd", 0.2)
    abs_ = run_method(pb, "abs", 0.2)
    assert set(sgd.batch_size) == {20}
    assert abs_.checks and max(abs_.batch_size) > 20  # kappa = 2 at the latest
    assert abs_.samples > sgd.samples == 40 * 20
    assert abs_.train_loss[-1] < abs_.train_loss[0]
    grown = [c for c in abs_.checks if c["batch_after"] > c["batch_before"]]
    # the linear rule: the step grows with the batch (lr * b / b0)
    assert abs_.lr[-1] == pytest.approx(0.2 * abs_.batch_size[-1] / 20)
    assert grown


@needs_fmnist
def test_cli_writes_table_json_and_figure(tmp_path, capsys):
    out = tmp_path / "convex"
    rc = cli_main(["convex", "--iterations", "30", "--check-every", "500", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "convex.json").read_text())
    names = [c["name"] for c in result["curves"]]
    assert names[-3:] == ["sgd", "abs", "absa"] and names[0].startswith("gd")
    assert result["data"]["train"] == 12000 and result["data"]["test"] == 2000
    for c in result["curves"]:
        assert len(c["train_loss"]) == 31 and c["train_loss"][-1] < c["train_loss"][0]
    assert (out / "convex.png").stat().st_size > 0
    assert "| abs |" in (out / "convex.md").read_text()
    assert "trouser" in capsys.readouterr().out


def test_table_reports_iterations_to_sgds_final_loss():
    curves = [
        {"name": "sgd", "iterations": [0, 1, 2], "train_loss": [1.0, 0.5, 0.4], "samples": 30,
         "batch_size": [10, 10, 10], "checks": [], "test_accuracy": 0.9, "diverged": False},
        {"name": "abs", "iterations": [0, 1, 2], "train_loss": [1.0, 0.3, 0.2], "samples": 60,
         "batch_size": [10, 20, 40], "checks": [{"batch_before": 10, "batch_after": 20}], "test_accuracy": 0.95,
         "diverged": False},
    ]  # fmt: skip
    text = table({"curves": curves})
    assert "| abs | 0.2000 | 1 | 60 | 40 | 1 | 95.00 |" in text


@pytest.mark.parametrize(
    "args, key",
    [(["--iterations", "0"], "--iterations"), (["--lr", "-1"], "--lr"), (["--classes", "3", "3"], "classes"),
     (["--data-dir", "/no/such/dir"], "--data-dir"), (["--seed", "-1"], "--seed")],
)  # fmt: skip
def test_user_errors_are_one_line_exit_2(args, key, capsys):
    assert cli_main(["convex", *args, "--out", "/tmp/unused-convex"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and key in err


def test_a_bad_out_is_refused_before_the_run(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli_main(["convex", "--iterations", "1000000", "--out", str(afile / "sub")]) == 2
    assert "afile is a file" in capsys.readouterr().err
