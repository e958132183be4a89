"""Short real training runs on synthetic data, recorded in SQLite and PostgreSQL."""

from pathlib import Path

import numpy as np
import pytest
import torch

from realfake.config import SplitConfig, TrainConfig
from realfake.hooks import TrainHooks
from realfake.models import build_model
from realfake.runs import SqlHooks, create_run, epoch_rows, train_run
from realfake.store import Run, RunStatus, session_scope
from realfake.train import (
    load_checkpoint,
    make_lr_scheduler,
    make_optimizer,
)

EPOCHS = 4


def small_config(weights, **overrides) -> TrainConfig:
    values = dict(
        backbone="mobilenet_v2", weights=str(weights), resize=72, image_size=64, rotation=5,
        color_jitter=0.1, lr=1e-3, batch_size=16, epochs=EPOCHS, seed=1,
        precision="fp32",  # the same numerics on every CPU; bf16 and auto have their own tests
    )
    return TrainConfig(**(values | overrides))


def new_run(factory, data, config) -> int:
    with session_scope(factory) as session:
        return create_run(session, config, data, SplitConfig(val=0.2, test=0.2, seed=0)).id


class Crash(BaseException):
    """Like a killed process: not an error the run could record."""


class Recording(SqlHooks):
    """The SQL hooks, plus a record of the epochs trained and an optional crash."""

    def __init__(self, factory, run_id, crash_in_epoch=None):
        super().__init__(factory, run_id)
        self.crash_in_epoch = crash_in_epoch
        self.epochs_seen = []

    def on_batch(self, split, epoch, done, total):
        if epoch not in self.epochs_seen:
            self.epochs_seen.append(epoch)
        if epoch == self.crash_in_epoch and done == 2:
            raise Crash("simulated crash")


@pytest.mark.slow
def test_short_run_learns_and_writes_epochs_times_three_rows(factory, synthetic_data, mobilenet_weights, tmp_path):
    run_id = new_run(factory, synthetic_data, small_config(mobilenet_weights))
    result = train_run(factory, run_id, tmp_path / "artifacts")

    assert result.outcome == "completed"
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        rows = epoch_rows(session, run_id)
        assert run.status is RunStatus.SUCCEEDED and run.epochs_done == EPOCHS and run.attempt == 1
        assert len(rows) == EPOCHS * 3
        assert {(r.epoch, r.split) for r in rows} == {(e, s) for e in range(1, EPOCHS + 1) for s in ("train", "val", "test")}
        val = {r.epoch: r for r in rows if r.split == "val"}
        print("val accuracy per epoch", [round(val[e].accuracy, 3) for e in sorted(val)])
        assert max(r.accuracy for r in val.values()) >= 0.9
        assert run.best_metric == max(r.accuracy for r in val.values())
        assert val[run.best_epoch].accuracy == run.best_metric
        assert all(r.n == 40 and r.tp + r.fp + r.tn + r.fn == 40 for r in val.values())
        assert set(val[EPOCHS].group_accuracy) == {"easy", "hard", "real"}
    ckpt = Path(run.checkpoint_dir)
    assert ckpt.parent == tmp_path / "artifacts" / "runs"
    last, best = load_checkpoint(ckpt / "last.pt"), load_checkpoint(ckpt / "best.pt")
    assert last["epoch"] == EPOCHS and set(last) >= {"model", "optimizer", "lr_scheduler", "epoch", "config"}
    assert best["epoch"] == run.best_epoch


@pytest.mark.slow
def test_interrupted_run_resumes_at_the_next_epoch(factory, synthetic_data, mobilenet_weights, tmp_path):
    run_id = new_run(factory, synthetic_data, small_config(mobilenet_weights))
    artifacts = tmp_path / "artifacts"
    crashing = Recording(factory, run_id, crash_in_epoch=3)
    with pytest.raises(Crash):
        train_run(factory, run_id, artifacts, hooks=crashing)
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.status is RunStatus.RUNNING and run.attempt == 1  # left for a takeover
        assert len(epoch_rows(session, run_id)) == 2 * 3
        ckpt = Path(run.checkpoint_dir)
    assert load_checkpoint(ckpt / "last.pt")["epoch"] == 2

    resumed = Recording(factory, run_id)
    assert train_run(factory, run_id, artifacts, hooks=resumed, grace_s=60) is None  # lease still fresh
    result = train_run(factory, run_id, artifacts, hooks=resumed, grace_s=0)

    assert result.outcome == "completed" and resumed.epochs_seen == [3, 4]
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.status is RunStatus.SUCCEEDED and run.attempt == 2 and run.error is None
        rows = epoch_rows(session, run_id)
        assert len(rows) == EPOCHS * 3
        assert {r.epoch: r.attempt for r in rows} == {1: 1, 2: 1, 3: 2, 4: 2}


@pytest.mark.slow
def test_an_error_in_training_fails_the_run_with_its_message(factory, synthetic_data, mobilenet_weights, tmp_path):
    run_id = new_run(factory, synthetic_data, small_config(mobilenet_weights))

    class Broken(Recording):
        def on_batch(self, split, epoch, done, total):
            if split == "val":
                raise ValueError("bad batch")

    with pytest.raises(ValueError):
        train_run(factory, run_id, tmp_path / "artifacts", hooks=Broken(factory, run_id))
    with session_scope(factory) as session:
        run = session.get(Run, run_id)
        assert run.status is RunStatus.FAILED and run.error == "ValueError: bad batch"
    assert train_run(factory, run_id, tmp_path / "artifacts", grace_s=0) is None  # finished: left alone


@pytest.mark.slow
def test_cancel_flag_stops_between_batches_and_keeps_rows(factory, synthetic_data, mobilenet_weights, tmp_path):
    run_id = new_run(factory, synthetic_data, small_config(mobilenet_weights))

    class CancelInEpochTwo(Recording):
        def on_batch(self, split, epoch, done, total):
            super().on_batch(split, epoch, done, total)
            if epoch == 2 and done == 1:
                with session_scope(self.factory) as session:
                    session.get(Run, self.run_id).cancel_requested = True
                self._next_poll = 0.0  # read the flag at the next batch

    hooks = CancelInEpochTwo(factory, run_id)
    result = train_run(factory, run_id, tmp_path / "artifacts", hooks=hooks)

    assert result.outcome == "stopped" and result.epochs_done == 1
    with session_scope(factory) as session:
        assert session.get(Run, run_id).status is RunStatus.CANCELLED
        assert len(epoch_rows(session, run_id)) == 3


def test_cosine_schedule_with_warmup():
    config = TrainConfig(lr=1.0, epochs=5, warmup_epochs=1, lr_schedule="cosine")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = make_lr_scheduler(optimizer, config)
    rates = []
    for _ in range(config.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.5)  # warm-up
    assert rates[1] == pytest.approx(1.0)
    assert rates[1] > rates[2] > rates[3] > rates[4] > 0


@pytest.mark.parametrize("backbone, head_name", [("mobilenet_v2", "classifier"), ("resnet18", "fc")])
def test_backbone_lr_gives_the_backbone_its_own_rate_and_the_schedule_scales_both(backbone, head_name):
    config = TrainConfig(backbone=backbone, weights="none", lr=1e-3, backbone_lr=1e-4, freeze=1,
                         epochs=3, lr_schedule="cosine")
    model = build_model(config)
    optimizer = make_optimizer(model, config)
    head, body = optimizer.param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert head["lr"] == 1e-3 and body["lr"] == 1e-4
    assert {names[id(p)].split(".")[0] for p in head["params"]} == {head_name}
    assert not any(names[id(p)].startswith(head_name + ".") for p in body["params"])
    # every trainable parameter in exactly one group; the frozen stem in none
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(grouped) < len(list(model.parameters()))
    scheduler = make_lr_scheduler(optimizer, config)
    optimizer.step()
    scheduler.step()
    assert head["lr"] / body["lr"] == pytest.approx(10.0)


def test_head_epochs_train_the_new_head_alone_then_the_backbone_joins():
    config = TrainConfig(backbone="mobilenet_v2", weights="none", optimizer="adamw", lr=1e-3, weight_decay=0.02,
                         freeze=4, head_epochs=1, warmup_epochs=1, epochs=3, lr_schedule="cosine")
    model = build_model(config)
    optimizer, names = make_optimizer(model, config), {id(p): n for n, p in model.named_parameters()}
    scheduler = make_lr_scheduler(optimizer, config)
    head, body = optimizer.param_groups
    assert {names[id(p)].split(".")[0] for p in head["params"]} == {"classifier"}
    images, targets = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])

    def step() -> dict[str, bool]:
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(images)[:, :2], targets).backward()
        optimizer.step()
        return {n: not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad}

    assert body["lr"] == 0.0 and head["lr"] == pytest.approx(0.5e-3)  # the head warms up alone
    changed = step()
    assert all(changed[n] for n in changed if n.startswith("classifier."))
    assert not any(changed[n] for n in changed if not n.startswith("classifier."))  # no decay either
    scheduler.step()
    assert body["lr"] == head["lr"] == pytest.approx(1e-3)
    changed = step()
    assert all(changed[n] for n in changed if n.startswith("features.18."))

    with pytest.raises(ValueError, match="head_epochs must be smaller than epochs"):
        TrainConfig(head_epochs=3, epochs=3)


def test_without_backbone_lr_one_group_as_older_checkpoints_hold():
    config = TrainConfig(backbone="mobilenet_v2", weights="none", lr=1e-3)
    (group,) = make_optimizer(build_model(config), config).param_groups
    assert group["lr"] == 1e-3


@pytest.mark.slow
def test_a_compiled_model_trains_like_the_eager_one_and_saves_plain_weights(synthetic_data, tmp_path):
    from realfake.samples import discover, stratified_split
    from realfake.train import fit

    # no dropout: compiled code draws its random numbers differently
    config = TrainConfig(backbone="resnet18", weights="none", dropout=0.0, resize=32, image_size=32, rotation=0, color_jitter=0,
                         epochs=1, batch_size=40, seed=3, decode_cache=False, precision="fp32")
    split = stratified_split(discover(synthetic_data), SplitConfig(val=0.2, test=0.2, seed=0))
    states = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        fit(config.model_copy(update={"compile": compiled}), synthetic_data, split, out)
        states[compiled] = load_checkpoint(out / "last.pt")["model"]
    assert states[True].keys() == states[False].keys()  # no `_orig_mod.` prefix: loads without compiling
    for name, eager in states[False].items():
        assert torch.allclose(states[True][name].float(), eager.float(), atol=1e-3, rtol=1e-3), name


class _Remembering(TrainHooks):
    """Keeps each epoch's metrics; with `stop_in_epoch`, stops at that epoch's second batch."""

    def __init__(self, stop_in_epoch=None):
        self.metrics, self.stop_in_epoch, self.epoch = {}, stop_in_epoch, 0

    def should_stop(self):
        return self.epoch == self.stop_in_epoch

    def on_batch(self, split, epoch, done, total):
        self.epoch = epoch

    def on_epoch_end(self, epoch, metrics, best):
        self.metrics[epoch] = metrics
        return True


class _LosingTheLease(_Remembering):
    def on_epoch_end(self, epoch, metrics, best):
        from realfake.runs import LeaseLost

        raise LeaseLost("taken over by another worker")


def test_a_worker_that_lost_its_lease_writes_no_checkpoint(synthetic_data, tmp_path):
    """Attempts share a run's checkpoint folder: the old owner must not replace the new one's best.pt."""
    from realfake.runs import LeaseLost
    from realfake.samples import discover, stratified_split
    from realfake.train import fit

    config = TrainConfig(backbone="resnet18", weights="none", resize=32, image_size=32, rotation=0, color_jitter=0,
                         epochs=2, batch_size=40, decode_cache=False, precision="fp32")
    split = stratified_split(discover(synthetic_data), SplitConfig(val=0.2, test=0.2, seed=0))
    with pytest.raises(LeaseLost):
        fit(config, synthetic_data, split, tmp_path / "run", _LosingTheLease())
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_averaged_weights_are_validated_kept_and_resumed(synthetic_data, tmp_path):
    from realfake.evaluation import predict
    from realfake.inference import ModelCache
    from realfake.samples import discover, stratified_split
    from realfake.train import fit

    config = TrainConfig(backbone="resnet18", weights="none", resize=32, image_size=32, rotation=0, color_jitter=0,
                         lr=1e-3, epochs=3, batch_size=40, seed=3, selection_metric="loss", ema_decay=0.9,
                         decode_cache=False, precision="fp32")  # compared with fp32 predictions below
    split = stratified_split(discover(synthetic_data), SplitConfig(val=0.2, test=0.2, seed=0))
    whole = _Remembering()
    assert fit(config, synthetic_data, split, tmp_path / "whole", whole).outcome == "completed"
    best, last = load_checkpoint(tmp_path / "whole" / "best.pt"), load_checkpoint(tmp_path / "whole" / "last.pt")

    # best.pt holds the weights that were validated (the average): predicting with it gives the val loss recorded
    p_fake = predict(tmp_path / "whole" / "best.pt", synthetic_data, split["val"], cache=ModelCache(precision="fp32"))
    fake = np.array([s.label for s in split["val"]]) == 1
    val_loss = -np.mean(np.log(np.where(fake, p_fake, 1 - p_fake)))
    assert val_loss == pytest.approx(whole.metrics[best["epoch"]]["val"].loss, abs=1e-4)
    averaged = {name.removeprefix("module."): value for name, value in last["ema"].items() if name != "n_averaged"}
    assert averaged.keys() == last["model"].keys()
    assert not torch.allclose(averaged["fc.3.weight"], last["model"]["fc.3.weight"])  # an average, not a copy

    # stopped in epoch 2 and resumed: the average carries on as if never broken
    assert fit(config, synthetic_data, split, tmp_path / "resumed", _Remembering(stop_in_epoch=2)).outcome == "stopped"
    assert fit(config, synthetic_data, split, tmp_path / "resumed").outcome == "completed"
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")["ema"]
    for name, value in last["ema"].items():
        assert torch.allclose(resumed[name].float(), value.float(), atol=1e-5), name


def test_mixup_blends_a_batch_with_a_permutation_of_itself_keeping_the_larger_share():
    from realfake.train import mix_batch

    torch.manual_seed(0)
    images = torch.randn(8, 3, 4, 4)
    weights = []
    for _ in range(50):
        blend, partner, weight = mix_batch(images, 0.2)
        assert sorted(partner.tolist()) == list(range(8))
        assert torch.allclose(blend, weight * images + (1 - weight) * images[partner])
        weights.append(weight)
    assert min(weights) >= 0.5 and max(weights) <= 1.0
    assert min(weights) < 0.8  # Beta(0.2, 0.2) also draws even blends, not only near-copies
    torch.manual_seed(0)
    assert torch.equal(torch.randn(8, 3, 4, 4), images)
    assert mix_batch(images, 0.2)[2] == weights[0]  # drawn from torch's seeded generator

    with pytest.raises(ValueError, match="mixup_alpha and region_weight exclude each other"):
        TrainConfig(mixup_alpha=0.2, region_weight=0.5)


def test_sharpness_aware_gradients_are_those_at_the_weights_moved_up_the_gradient():
    import copy

    from torch import nn

    from realfake.train import sharpness_aware_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)  # a frozen weight has no gradient and is not moved
    probe = copy.deepcopy(model)  # moved by hand below, for the expected gradients
    x, y = torch.randn(16, 5), torch.randint(0, 2, (16,))

    def loss_at():
        return nn.functional.cross_entropy(model(x), y)

    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    loss_at().backward()
    stats_after_one_pass = model[1].running_mean.clone()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    norm = torch.cat([g.flatten() for g in gradients.values()]).norm()

    # The expected gradients, by hand on the copy moved 0.5 along the unit gradient.
    with torch.no_grad():
        for name, p in probe.named_parameters():
            if name in gradients:
                p.add_(0.5 * gradients[name] / norm)
    nn.functional.cross_entropy(probe(x), y).backward()

    sharpness_aware_gradients(model, loss_at, rho=0.5)

    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), f"{name} not restored"
        if name in gradients:
            expected = dict(probe.named_parameters())[name].grad
            assert torch.allclose(p.grad, expected, atol=1e-6), name
            assert not torch.allclose(p.grad, gradients[name]), f"{name}: the gradient at w itself"
    assert model[0].bias.grad is None
    assert torch.equal(model[1].running_mean, stats_after_one_pass)  # the probe left no statistics
    assert model[1].momentum == 0.1


def test_sam_rho_makes_every_training_step_sharpness_aware(synthetic_data, mobilenet_weights, tmp_path, monkeypatch):
    import realfake.train
    from realfake.samples import discover, stratified_split

    probes = []
    real = realfake.train.sharpness_aware_gradients
    monkeypatch.setattr(realfake.train, "sharpness_aware_gradients",
                        lambda model, loss_at, rho: probes.append(rho) or real(model, loss_at, rho))
    config = small_config(mobilenet_weights, decode_cache=False, epochs=1, sam_rho=0.05)
    split = stratified_split(discover(synthetic_data), SplitConfig(val=0.2, test=0.2, seed=0))
    hooks = _Remembering()
    assert realfake.train.fit(config, synthetic_data, split, tmp_path / "sam", hooks).outcome == "completed"
    batches = -(-len(split["train"]) // config.batch_size)
    assert probes == [0.05] * batches
    assert np.isfinite(hooks.metrics[1]["train"].loss)


@pytest.mark.slow
def test_a_run_with_mixup_trains_on_blends_and_still_learns(synthetic_data, mobilenet_weights, tmp_path):
    from realfake.samples import discover, stratified_split
    from realfake.train import fit

    config = small_config(mobilenet_weights, decode_cache=False)
    split = stratified_split(discover(synthetic_data), SplitConfig(val=0.2, test=0.2, seed=0))
    plain, mixed = _Remembering(), _Remembering()
    assert fit(config, synthetic_data, split, tmp_path / "plain", plain).outcome == "completed"
    mixup = config.model_copy(update={"mixup_alpha": 0.4})
    assert fit(mixup, synthetic_data, split, tmp_path / "mixup", mixed).outcome == "completed"
    # the same seed and batches: only the blending tells the two runs' training apart
    assert mixed.metrics[1]["train"].loss != pytest.approx(plain.metrics[1]["train"].loss, rel=1e-3)
    for name, run in (("plain", plain), ("mixup", mixed)):
        print(name, "val accuracy", [round(m["val"].accuracy, 3) for m in run.metrics.values()])
    assert max(m["val"].accuracy for m in mixed.metrics.values()) >= 0.85


def _region_faces(folder: Path, per_class: int = 40, size: int = 64) -> list[tuple[str, tuple[int, ...]]]:
    """Faces whose fakes had some of four regions painted over, named by the regions (`_1010`)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    boxes = [(8, 8, 24, 24), (40, 8, 56, 24), (24, 24, 40, 40), (20, 44, 44, 56)]  # eyes, nose, mouth
    (folder / "real").mkdir(parents=True)
    (folder / "fake").mkdir()
    written = []
    for index in range(per_class):
        noise = lambda: Image.fromarray(rng.integers(60, 190, (size, size, 3), dtype=np.uint8))  # noqa: E731
        noise().save(folder / "real" / f"real_{index:05d}.jpg", quality=95)
        written.append((f"real/real_{index:05d}.jpg", (0, 0, 0, 0)))
        bits = tuple(int(b) for b in rng.integers(0, 2, 4))
        bits = bits if any(bits) else (0, 0, 0, 1)
        image = noise()
        for bit, box in zip(bits, boxes):
            if bit:
                image.paste((255, 255, 255), box)
        name = f"fake/easy_{index:05d}_{''.join(map(str, bits))}.jpg"
        image.save(folder / name, quality=95)
        written.append((name, bits))
    return written


@pytest.mark.slow
def test_region_supervision_learns_which_regions_a_fake_replaced(factory, mobilenet_weights, tmp_path):
    """With region_weight the head has four more outputs, trained on the regions a fake's
    file name gives; P(fake) everywhere else still comes from the two class logits."""
    from sklearn.metrics import roc_auc_score

    from realfake.data import FaceDataset, eval_transform
    from realfake.evaluation import predict
    from realfake.inference import ModelCache
    from realfake.samples import discover
    from realfake.scoring import model_checkpoint

    data = tmp_path / "regions"
    written = dict(_region_faces(data))
    config = small_config(mobilenet_weights, resize=64, image_size=64, rotation=0, color_jitter=0, epochs=3,
                          region_weight=1.0)
    run_id = new_run(factory, data, config)
    assert train_run(factory, run_id, tmp_path / "artifacts").outcome == "completed"
    with session_scope(factory) as session:
        checkpoint = model_checkpoint(session.get(Run, run_id))

    model, loaded, _ = ModelCache(precision="fp32").get(checkpoint)
    samples = discover(data)
    images = torch.stack([image for image, _, _ in FaceDataset(data, samples, eval_transform(loaded))])
    with torch.inference_mode():
        output = model(images)
    assert output.shape == (len(samples), 6)
    truth = torch.tensor([written[s.path] for s in samples])
    region_auc = [roc_auc_score(truth[:, r], output[:, 2 + r]) for r in range(4)]
    print("region ROC-AUC", [round(a, 3) for a in region_auc])
    assert min(region_auc) > 0.8
    p_fake = predict(checkpoint, data, samples, cache=ModelCache(precision="fp32"))
    assert p_fake.tolist() == pytest.approx(torch.softmax(output[:, :2], 1)[:, 1].tolist(), abs=1e-4)


def test_auto_precision_takes_bf16_only_where_the_cpu_has_it(mobilenet_weights, monkeypatch):
    from realfake import train
    from realfake.train import Runtime

    cpu = small_config(mobilenet_weights, device="cpu", precision="auto")
    for native, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(train, "cpu_has_bf16", lambda native=native: native)
        assert Runtime.for_config(cpu).autocast_dtype is expected
        assert Runtime.for_scoring(cpu).autocast_dtype is expected
        # what is asked for is what runs, native or not; channels-last in every case
        for asked, dtype in (("bf16", torch.bfloat16), ("fp32", None)):
            runtime = Runtime.for_config(cpu.model_copy(update={"precision": asked}))
            assert runtime.autocast_dtype is dtype and runtime.channels_last
            assert Runtime.for_scoring(cpu, asked).autocast_dtype is dtype


def test_bf16_on_the_cpu_trains_channels_last(factory, synthetic_data, mobilenet_weights, tmp_path, caplog):
    from realfake.train import Runtime, cpu_has_bf16

    config = small_config(mobilenet_weights, precision="bf16", device="cpu", epochs=1)
    runtime = Runtime.for_config(config)
    assert runtime.autocast_dtype is torch.bfloat16 and runtime.channels_last
    run_id = new_run(factory, synthetic_data, config)
    assert train_run(factory, run_id, tmp_path / "artifacts").outcome == "completed"
    with session_scope(factory) as session:
        rows = epoch_rows(session, run_id)
    assert len(rows) == 3 and all(0.0 <= r.loss < 10.0 for r in rows)
    emulated = "without native bf16" in caplog.text
    assert emulated is not cpu_has_bf16()  # the user hears why an emulated bf16 run is slow


@pytest.mark.slow
def test_a_run_with_tapped_stages_trains_and_still_learns(synthetic_data, mobilenet_weights, tmp_path):
    from realfake.samples import discover, stratified_split
    from realfake.train import fit

    config = small_config(mobilenet_weights, freeze=4, tap_stages=(6, 13))
    split = stratified_split(discover(synthetic_data), SplitConfig(val=0.2, test=0.2, seed=0))
    run = _Remembering()
    assert fit(config, synthetic_data, split, tmp_path / "tapped", run).outcome == "completed"
    print("tapped val accuracy", [round(m["val"].accuracy, 3) for m in run.metrics.values()])
    assert max(m["val"].accuracy for m in run.metrics.values()) >= 0.85
    best = build_model(config)
    best.load_state_dict(load_checkpoint(tmp_path / "tapped" / "best.pt")["model"])
    assert best.features.norm.num_batches_tracked > 0  # the statistics' BatchNorm trained with the rest
