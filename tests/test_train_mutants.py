"""Training internals a mutation run found untested: every window a split holds is drawn (its last
token a target too), the ranks' slices of a step's rows, the micro-batches' gradient sync, clipping
(after the loss scale is undone), the validation split an evaluation scores, and --val-fraction
where a val.bin makes it moot."""
import logging
import random

import numpy as np
import pytest
import torch

from gptfast import Tokenizer
from gptfast.train import TrainArgs, get_batch, load_data, make_scaler, micro_steps, optimizer_step

DEFAULT_TOKENIZER = "gptfast/assets/default"


def _seed():
    return random.randrange(1 << 30)


def test_every_window_of_the_split_is_drawn_its_last_token_a_target_too():
    """nanoGPT draws starts in [0, len - block_size): the last window ends on the split's last
    token. An exclusive bound one lower never makes that token a target."""
    rnd = random.Random(_seed())
    block = rnd.randint(3, 9)
    n = block + 1 + rnd.randint(1, 4)  # n - block windows
    tokens = np.arange(n, dtype=np.uint16)
    gen = torch.Generator().manual_seed(_seed())
    x, y = get_batch(tokens, 400, block, gen, "cpu")
    assert x.shape == y.shape == (400, block)
    assert torch.equal(y, x + 1)  # windows of consecutive tokens, the targets shifted by one
    assert sorted(set(x[:, 0].tolist())) == list(range(n - block))
    assert int(y.max()) == n - 1


def test_the_ranks_take_disjoint_slices_of_the_rows_one_process_draws():
    rnd = random.Random(_seed())
    tokens = np.asarray([rnd.randrange(60000) for _ in range(rnd.randint(300, 700))], dtype=np.uint16)
    b, world, block, seed = rnd.randint(1, 4), rnd.randint(2, 4), rnd.randint(5, 17), _seed()
    one = get_batch(tokens, b * world, block, torch.Generator().manual_seed(seed), "cpu")
    ranks = [get_batch(tokens, b, block, torch.Generator().manual_seed(seed), "cpu", rank=r, world=world)
             for r in range(world)]
    for i in (0, 1):
        assert torch.equal(torch.cat([r[i] for r in ranks]), one[i])


def test_ddp_synchronises_on_the_last_micro_batch_only():
    class Model:
        def no_sync(self):
            return "no_sync"

    n = random.randint(2, 6)
    contexts = [type(c).__name__ if not isinstance(c, str) else c for _, c in micro_steps(Model(), n, world=2)]
    assert contexts == ["no_sync"] * (n - 1) + ["nullcontext"]
    assert [k for k, _ in micro_steps(Model(), n, world=2)] == list(range(n))
    assert all(not isinstance(c, str) for _, c in micro_steps(Model(), n, world=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_step_clips_the_unscaled_gradient_to_grad_clip(dtype):
    """SGD with lr 1 moves the parameters by the gradient it is handed: its norm is grad_clip
    (the gradient is far larger), measured after the loss scale of float16 training is undone."""
    gen = torch.Generator().manual_seed(_seed())
    params = [torch.nn.Parameter(torch.randn(7, 3, generator=gen)), torch.nn.Parameter(torch.randn(5, generator=gen))]
    before = [p.detach().clone() for p in params]
    scaler = make_scaler(torch.device("cpu"), dtype, None)
    assert scaler.is_enabled() == (dtype == torch.float16)
    opt = torch.optim.SGD(params, lr=1.0)
    loss = 40 * sum((p * torch.randn(p.shape, generator=gen)).sum() for p in params)
    scaler.scale(loss).backward()
    clip = random.uniform(0.2, 0.9)
    optimizer_step(opt, scaler, params, clip)
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params)])
    assert float(moved.norm()) == pytest.approx(clip, rel=1e-4)


def _token_dir(path, n_train, n_val):
    rnd = random.Random(_seed())
    path.mkdir()
    np.asarray([rnd.randrange(4096) for _ in range(n_train)], dtype=np.uint16).tofile(path / "train.bin")
    if n_val:
        np.asarray([rnd.randrange(4096) for _ in range(n_val)], dtype=np.uint16).tofile(path / "val.bin")
    return path


def test_a_bin_without_val_bin_splits_its_tail_off_as_validation(tmp_path):
    n, frac, block = random.randint(500, 900), random.choice([0.1, 0.25, 0.3]), random.randint(5, 20)
    data = _token_dir(tmp_path / "d", n, 0)
    all_ids = np.fromfile(data / "train.bin", dtype=np.uint16)
    args = TrainArgs(data=str(data / "train.bin"), out=str(tmp_path / "o"), block_size=block, val_fraction=frac)
    train, val = load_data(args, Tokenizer.from_pretrained(DEFAULT_TOKENIZER), 4096)
    n_val = max(block + 2, int(n * frac))
    assert len(val) == n_val and len(train) == n - n_val
    assert np.array_equal(np.concatenate([train, val]), all_ids)  # disjoint, nothing left out


def test_a_val_fraction_given_with_a_val_bin_says_it_does_not_apply(tmp_path, caplog):
    data = _token_dir(tmp_path / "d", random.randint(300, 500), random.randint(40, 90))
    tok = Tokenizer.from_pretrained(DEFAULT_TOKENIZER)
    base = dict(data=str(data), out=str(tmp_path / "o"), block_size=9)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        train, val = load_data(TrainArgs(**base), tok, 4096)
    assert caplog.text == ""  # the default --val-fraction: nothing to say
    assert np.array_equal(val, np.fromfile(data / "val.bin", dtype=np.uint16))
    assert np.array_equal(train, np.fromfile(data / "train.bin", dtype=np.uint16))
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        _, val2 = load_data(TrainArgs(**base, val_fraction=0.3), tok, 4096)
    assert np.array_equal(val2, val)
    assert caplog.text.count("--val-fraction 0.3 does not apply") == 1
    assert f"--data {data} brings its own validation split (val.bin, {len(val)} tokens)" in caplog.text
    caplog.clear()  # the other ranks of a distributed run say nothing (train passes warn=rank == 0)
    with caplog.at_level(logging.WARNING, logger="gptfast"):
        _, val3 = load_data(TrainArgs(**base, val_fraction=0.3), tok, 4096, warn=False)
    assert caplog.text == "" and np.array_equal(val3, val)


@pytest.mark.parametrize("rank", [0, 1])
def test_train_has_rank_0_alone_say_the_val_fraction_does_not_apply(tmp_path, monkeypatch, rank):
    import gptfast.train as train_mod

    class Stop(Exception):
        pass
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop
    data = _token_dir(tmp_path / "d", 400, 60)
    monkeypatch.setattr(train_mod, "setup_device", lambda name: (rank, 2, torch.device("cpu")))
    monkeypatch.setattr(train_mod, "load_data", spy)
    with pytest.raises(Stop):
        train_mod.train(TrainArgs(data=str(data), out=str(tmp_path / "o"), tokenizer=DEFAULT_TOKENIZER, block_size=9,
                                  n_layer=1, n_head=2, n_embd=16, val_fraction=0.3), progress=False)
    assert seen["warn"] is (rank == 0)


def test_the_evaluation_scores_the_validation_split(tmp_path, monkeypatch):
    import gptfast.train as train_mod

    data = _token_dir(tmp_path / "d", random.randint(400, 600), random.randint(60, 90))
    seen, real = [], train_mod.estimate_loss

    def recording(model, tokens, *a, **kw):
        seen.append(np.asarray(tokens).copy())
        return real(model, tokens, *a, **kw)

    monkeypatch.setattr(train_mod, "estimate_loss", recording)
    train_mod.train(TrainArgs(data=str(data), out=str(tmp_path / "o"), tokenizer=DEFAULT_TOKENIZER, n_layer=1,
                              n_head=2, n_embd=16, block_size=8, batch_size=2, steps=2, eval_every=1, eval_batches=1,
                              warmup=1, device="cpu"), progress=False)
    val = np.fromfile(data / "val.bin", dtype=np.uint16)
    assert len(seen) == 2 and all(np.array_equal(s, val) for s in seen)


def test_an_atomic_write_syncs_the_new_file_before_it_takes_the_name(tmp_path, monkeypatch):
    """The rename must publish data already on disk: after a power cut a renamed but unsynced
    file can be empty. The fsynced descriptor is the file the name ends up at, before os.replace."""
    import os

    from gptfast import checkpoint

    target = tmp_path / "train_state.pt"
    checkpoint.atomic_torch_save({"old": torch.zeros(3)}, str(target))
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    value = torch.randn(5)
    checkpoint.atomic_torch_save({"new": value}, str(target))
    monkeypatch.undo()
    renames = [i for i, e in enumerate(events) if e[0] == "replace"]
    assert len(renames) == 1 and events[renames[0]][2] == str(target)
    inode = events[renames[0]][1]
    assert inode == os.stat(target).st_ino
    assert ("fsync", inode) in events[:renames[0]]  # the data, before the rename
    assert torch.equal(torch.load(target, weights_only=True)["new"], value)


def _tiny_run(data, out, **kw):
    return TrainArgs(data=str(data), out=str(out), tokenizer=DEFAULT_TOKENIZER, n_layer=1, n_head=2, n_embd=16,
                     block_size=8, eval_batches=1, warmup=1, device="cpu", **kw)


def test_accumulated_gradients_are_those_of_the_whole_batchs_mean_loss(tmp_path, monkeypatch):
    """The optimizer (and the clip, which sees the raw norm) gets the gradient of the mean loss
    over the step's rows, however many micro-batches they come in: each micro-batch's loss is
    divided by grad_accum. Adam hides a gradient grad_accum times too large, all but the clip."""
    import gptfast.train as train_mod

    data = _token_dir(tmp_path / "d", random.randint(400, 600), random.randint(60, 90))
    grads, real = [], train_mod.optimizer_step

    def recording(opt, scaler, params, grad_clip):
        params = list(params)
        grads.append([p.grad.clone() for p in params])
        return real(opt, scaler, params, grad_clip)

    monkeypatch.setattr(train_mod, "optimizer_step", recording)
    accum = random.randint(2, 4)
    for batch, ga in ((2 * accum, 1), (2, accum)):
        train_mod.train(_tiny_run(data, tmp_path / f"b{batch}x{ga}", batch_size=batch, grad_accum=ga, steps=1,
                                  eval_every=1), progress=False)
    (whole,), (parts,) = grads[:1], grads[1:]
    assert len(grads) == 2
    for a, b in zip(whole, parts):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_a_crash_while_a_checkpoint_takes_its_name_leaves_latest_on_the_previous_one(tmp_path, monkeypatch):
    """checkpoints/latest moves to a checkpoint once it is complete under its final name: a crash
    before that resumes from the previous one (not an error naming a missing step)."""
    import os

    import gptfast.train as train_mod
    from gptfast.train import latest_checkpoint

    data = _token_dir(tmp_path / "d", random.randint(400, 600), random.randint(60, 90))
    args = _tiny_run(data, tmp_path / "o", batch_size=2, steps=2, eval_every=1)
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if os.path.basename(dst) == "step-0000002":
            raise KeyboardInterrupt  # the process dies here
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(args, progress=False)
    monkeypatch.undo()
    assert [os.path.basename(c) for c in calls] == ["step-0000001", "step-0000002"]
    assert latest_checkpoint(args.out).endswith("step-0000001")
    summary = train_mod.train(args, progress=False)  # the same command resumes from step 1
    assert summary["steps"] == 2 and latest_checkpoint(args.out).endswith("step-0000002")


def test_a_resume_restores_the_loss_scale_it_reached():
    """A float16 run that backed its loss scale off (overflows) goes on with that scale, not 2^16
    again: a short run never moves it, so only the restore itself shows whether it is read."""
    scaler = make_scaler(torch.device("cpu"), torch.float16, None)
    scaler.scale(torch.ones(()))  # the scale tensor is made on first use
    scale = 2.0 ** random.randint(3, 12)
    scaler.update(new_scale=scale)
    resumed = make_scaler(torch.device("cpu"), torch.float16, {"scaler": scaler.state_dict()})
    assert resumed.get_scale() == scale
    assert make_scaler(torch.device("cpu"), torch.float16, None).get_scale() == 65536.0
    assert not make_scaler(torch.device("cpu"), torch.bfloat16, {"scaler": scaler.state_dict()}).is_enabled()


def test_token_files_open_in_the_dtype_meta_json_names(tmp_path):
    """A vocabulary over 65,536 ids is stored as uint32 (meta.json says so): read as nanoGPT's
    uint16 default, every id would come back split into two wrong ones."""
    import json

    from gptfast.data import FORMAT, VERSION, open_tokens

    rnd = random.Random(_seed())
    ids = np.asarray([rnd.randrange(1 << 16, 100_000) for _ in range(rnd.randint(30, 60))], dtype=np.uint32)
    val = np.asarray([rnd.randrange(100_000) for _ in range(rnd.randint(5, 20))], dtype=np.uint32)
    ids.tofile(tmp_path / "train.bin")
    val.tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "dtype": "uint32",
                                                    "vocab_size": 100_000}))
    tokens, got_val, meta, directory = open_tokens(str(tmp_path))
    assert tokens.dtype == np.uint32 and np.array_equal(tokens, ids)
    assert np.array_equal(got_val, val) and meta["vocab_size"] == 100_000 and directory == str(tmp_path)


def test_a_resumed_run_with_dropout_draws_the_uninterrupted_runs_masks(tmp_path, monkeypatch):
    """--init a checkpoint with dropout (Hugging Face GPT-2's configs have 0.1): each step's
    masks come from (seed, step, rank), so a resume still ends at the uninterrupted run's weights."""
    from gptfast import GPT, GPTConfig
    from gptfast.train import latest_checkpoint, train
    from test_cli_train import _interrupted

    torch.manual_seed(_seed())
    init = tmp_path / "init"
    GPT(GPTConfig(vocab_size=4096, n_positions=16, n_layer=1, n_head=2, n_embd=16, embd_pdrop=0.2, resid_pdrop=0.2,
                  attn_pdrop=0.2)).save_pretrained(str(init))
    data = _token_dir(tmp_path / "d", random.randint(400, 600), random.randint(60, 90))
    base = dict(data=str(data), tokenizer=DEFAULT_TOKENIZER, init=str(init), block_size=8, batch_size=2, steps=4,
                eval_every=2, eval_batches=1, warmup=1, device="cpu")
    train(TrainArgs(out=str(tmp_path / "whole"), **base), progress=False)
    _interrupted(monkeypatch, TrainArgs(out=str(tmp_path / "cut"), **base), losses=2 + 1)  # dies in step 3
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("step-0000002")
    train(TrainArgs(out=str(tmp_path / "cut"), **base), progress=False)
    a = GPT.from_pretrained(str(tmp_path / "whole")).state_dict()
    b = GPT.from_pretrained(str(tmp_path / "cut")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
