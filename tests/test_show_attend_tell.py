"""Variant 6, Show, Attend and Tell (`model=dino_sat`): the soft attention (captioner.decoders.SoftAttention), the
ShowAttendTellDecoder's decoder interface (step-wise decoding = teacher forcing, beams, image_index, autocast), the
doubly stochastic regulariser, and the variant end to end (train.py, its checkpoint, the caption command)."""

from __future__ import annotations

import functools
import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from captioner.data.vocabulary import Vocabulary
from captioner.decoders import MultiHeadAttention, ShowAttendTellDecoder, SoftAttention, TransformerDecoder
from captioner.decoding import beam_search, greedy_decode
from conftest import doubly_stochastic_reference, run_here

PAD, SOS, EOS = Vocabulary.pad_id, Vocabulary.sos_id, Vocabulary.eos_id
V, D, GRID = 24, 32, (2, 3)  # 4 specials + 20 words; a 2x3 grid of 32-dim image tokens
T = GRID[0] * GRID[1]
ATTENTIONS = {"soft": partial(SoftAttention, attention_dim=16), "mha": partial(MultiHeadAttention, num_heads=2)}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def sat(attention: str = "soft", seed: int = 0, **kwargs) -> ShowAttendTellDecoder:
    torch.manual_seed(seed)
    sizes = dict(embed_dim=16, hidden_dim=32, memory_dim=32, dropout=0.3) | kwargs
    return ShowAttendTellDecoder(vocab_size=V, feature_dim=D, grid=GRID, attention=ATTENTIONS[attention], **sizes)


def features(B: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))


def captions(lengths: list[int], L: int, seed: int = 0) -> torch.Tensor:
    """<sos> w1..wn <eos> <pad>.. for each length n, as one (B, L) batch."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.full((len(lengths), L), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        caps[i, 0], caps[i, n + 1] = SOS, EOS
        caps[i, 1:n + 1] = torch.randint(4, V, (n,), generator=g)
    return caps


def stepwise(decoder, feats, caps, attention: bool = False):
    """Teacher tokens fed one at a time through init_state/step -> logits (B, L-1, V) [, attention (B, L-1, T)]."""
    state, logits, atts = decoder.init_state(feats), [], []
    for t in range(caps.shape[1] - 1):
        out = decoder.step(caps[:, t], state, return_attention=attention)
        logits.append(out[0])
        state = out[1]
        if attention:
            atts.append(out[2])
    return (torch.stack(logits, 1), torch.stack(atts, 1)) if attention else torch.stack(logits, 1)


# -- SoftAttention -------------------------------------------------------------------------------------------------

def test_soft_attention_is_show_attend_tells_additive_attention():
    torch.manual_seed(0)
    att = SoftAttention(d_model=8, dropout=0.0, attention_dim=6).eval()
    memory, x = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    k, v = att.keys_values(memory)
    assert k.shape == (2, 1, 5, 6) and v.shape == (2, 1, 5, 8)
    y, w = att(x, k, v, need_weights=True)
    # e_ti = w^T tanh(W_a a_i + W_h h_t), alpha = softmax_i(e), y_t = sum_i alpha_ti a_i (the values are the memory)
    e = torch.einsum("btia,a->bti", torch.tanh(att.key(memory)[:, None] + att.query(x)[:, :, None]),
                     att.score.weight[0]) + att.score.bias
    alpha = e.softmax(-1)
    torch.testing.assert_close(w, alpha[:, None])
    torch.testing.assert_close(y, alpha @ memory)
    assert att(x, k, v)[1] is None


def test_soft_attention_groups_equal_expanded_keys():
    """N = G*B query rows sharing one row of keys/values (beam search) = the same rows against G copies."""
    torch.manual_seed(0)
    att = SoftAttention(d_model=8, dropout=0.0, attention_dim=6).eval()
    B, G = 3, 4
    k, v = att.keys_values(torch.randn(B, 5, 8))
    x = torch.randn(B * G, 2, 8)
    shared = att(x, k, v, need_weights=True)
    copied = att(x, k.repeat_interleave(G, 0), v.repeat_interleave(G, 0), need_weights=True)
    for a, b in zip(shared, copied):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="cannot share"):
        att(torch.randn(5, 2, 8), k, v)  # 5 rows cannot be split among 3 images


def test_soft_attention_index_selects_the_rows_after_projecting():
    torch.manual_seed(0)
    att = SoftAttention(d_model=8, dropout=0.0, attention_dim=6)
    memory, index = torch.randn(3, 5, 8), torch.tensor([0, 0, 2, 1])
    for a, b in zip(att.keys_values(memory, index), att.keys_values(memory[index])):
        torch.testing.assert_close(a, b)


def test_soft_attention_causal_mask_hides_the_future():
    torch.manual_seed(0)
    att = SoftAttention(d_model=8, dropout=0.0, attention_dim=6).eval()
    x = torch.randn(2, 5, 8)
    y, w = att(x, *att.keys_values(x), causal=True, need_weights=True)
    assert torch.equal(w[:, 0].triu(1), torch.zeros(2, 5, 5))  # no weight on a later position
    changed = x.clone()
    changed[:, 3:] = torch.randn(2, 2, 8)  # the future of positions 0..2
    y2, _ = att(changed, *att.keys_values(changed), causal=True)
    torch.testing.assert_close(y2[:, :3], y[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(y2[:, 3:], y[:, 3:])
    with pytest.raises(ValueError, match="causally"):
        att(torch.randn(4, 5, 8), *att.keys_values(x), causal=True)


def test_transformer_with_soft_attention_decodes_as_it_is_taught():
    """attention=soft in every attention layer of the transformer: self-attention (causal, cached) and cross."""
    torch.manual_seed(0)
    dec = TransformerDecoder(vocab_size=V, feature_dim=D, grid=GRID, attention=ATTENTIONS["soft"], d_model=16,
                             encoder_layers=1, decoder_layers=2, ff_dim=32).eval()
    feats, caps = features(3), captions([2, 5, 1], L=8)
    with torch.no_grad():
        logits, att = dec(feats, caps, return_attention=True)
        step_logits, step_att = stepwise(dec, feats, caps, attention=True)
    torch.testing.assert_close(step_logits, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(step_att, att, rtol=0, atol=1e-5)
    assert greedy_decode(dec, feats, max_len=5) == [beam_search(dec, feats[i:i + 1], beam_size=1, max_len=5)[0]
                                                    for i in range(3)]


# -- the decoder ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", list(ATTENTIONS))
@pytest.mark.parametrize("hidden_dim", [32, 24])  # 24: h reaches the attention through a query projection
def test_step_equals_teacher_forcing(attention, hidden_dim):
    dec = sat(attention, hidden_dim=hidden_dim).eval()
    feats, caps = features(4), captions([1, 3, 6, 4], L=9)
    with torch.no_grad():
        logits = dec(feats, caps)
        assert logits.shape == (4, 8, V)
        torch.testing.assert_close(stepwise(dec, feats, caps), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_image_index_equals_repeating_the_features(attention):
    """Captions of U distinct images (image_index) = the features repeated per caption, and = step-wise decoding."""
    dec = sat(attention).eval()
    feats, index = features(3), torch.tensor([0, 0, 1, 2, 2, 2])
    caps = captions([1, 4, 2, 6, 3, 5], L=8)
    with torch.no_grad():
        indexed, att = dec(feats, caps, index, return_attention=True)
        repeated, att_repeated = dec(feats[index], caps, return_attention=True)
        torch.testing.assert_close(indexed, repeated, rtol=0, atol=1e-6)
        torch.testing.assert_close(att, att_repeated, rtol=0, atol=1e-6)
        torch.testing.assert_close(stepwise(dec, feats[index], caps), indexed, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_attention_is_a_distribution_over_the_tokens_in_teacher_forcing_and_steps(attention):
    dec = sat(attention).eval()
    feats, caps = features(3), captions([2, 5, 1], L=8)
    with torch.no_grad():
        logits, att = dec(feats, caps, return_attention=True)
        torch.testing.assert_close(logits, dec(feats, caps), rtol=0, atol=1e-6)
        step_logits, step_att = stepwise(dec, feats, caps, attention=True)
    assert att.shape == step_att.shape == (3, 7, T)
    for a in (att, step_att):
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 7), rtol=0, atol=1e-5)
    torch.testing.assert_close(step_att, att, rtol=0, atol=1e-5)
    torch.testing.assert_close(step_logits, logits, rtol=0, atol=1e-5)
    assert (att[0] - att[1]).abs().max() > 1e-4  # not uniform: the attention reads the image and the words


def test_padding_never_reaches_valid_positions():
    dec = sat().eval()
    feats, caps = features(4), captions([1, 3, 6, 4], L=9)
    junk = caps.clone()
    after_eos = torch.cumsum(caps == EOS, dim=1).bool() & (caps != EOS)
    junk[after_eos] = torch.randint(4, V, (int(after_eos.sum()),))
    valid = caps[:, 1:] != PAD
    a, b = dec(feats, caps), dec(feats, junk)
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-6)
    assert not torch.allclose(a[~valid], b[~valid])


def test_initial_state_is_the_mean_annotation_and_beams_share_the_memory():
    dec = sat().eval()
    feats = features(3)
    state = dec.init_state(feats)
    memory = dec.feat_proj(feats)
    torch.testing.assert_close(state["h"], torch.tanh(dec.init_h(memory.mean(1))))
    torch.testing.assert_close(state["c"], dec.init_c(memory.mean(1)))
    assert state["memory_k"].shape == (3, 1, T, 16) and state["memory_v"].shape == (3, 1, T, 32)
    assert all(name.startswith(dec.per_image_state) for name in ("memory_k", "memory_v"))
    # G beams of each image against one row of memory = against G copies of it
    G, tokens = 4, torch.randint(4, V, (3 * 4,))
    grouped = {n: x if n.startswith(dec.per_image_state) else x.repeat_interleave(G, 0) for n, x in state.items()}
    expanded = {n: x.repeat_interleave(G, 0) for n, x in state.items()}
    with torch.no_grad():
        for _ in range(3):
            a, grouped, att_a = dec.step(tokens, grouped, return_attention=True)
            b, expanded, att_b = dec.step(tokens, expanded, return_attention=True)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            torch.testing.assert_close(att_a, att_b, rtol=0, atol=1e-6)
            tokens = a.argmax(-1)
    assert grouped["memory_k"] is state["memory_k"]  # handed back as is: beam search never copies it


def test_wrong_grid_and_missing_attention_are_refused():
    with pytest.raises(ValueError, match="grid"):
        sat().init_state(torch.randn(2, 5, D))
    with pytest.raises(ValueError, match="attention mechanism"):
        ShowAttendTellDecoder(vocab_size=V, feature_dim=D, grid=GRID, attention=None)


@functools.lru_cache(maxsize=None)
def _trained(steps: int = 40):
    """A briefly trained SAT (as tests/test_decoding.py's `_trained`): image-dependent captions of varied lengths."""
    torch.manual_seed(0)
    Vb, n = 40, 8
    dec = ShowAttendTellDecoder(vocab_size=Vb, feature_dim=16, grid=(3, 3), embed_dim=16, hidden_dim=32,
                                memory_dim=32, dropout=0.0, attention=partial(SoftAttention, attention_dim=16))
    feats = torch.randn(2 * n, 9, 16)
    caps = torch.full((n, 10), PAD)
    for i in range(n):
        caps[i, :i + 3] = torch.tensor([SOS, *torch.randint(4, Vb, (i + 1,)).tolist(), EOS])
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(dec(feats[:n], caps).flatten(0, 1), caps[:, 1:].flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dec.eval(), feats[n // 2:n + n // 2]


@pytest.mark.parametrize("min_len, length_penalty", [(1, 0.0), (3, 0.7)])
def test_batched_beam_search_equals_one_image_at_a_time(min_len, length_penalty):
    dec, feats = _trained()
    kw = dict(beam_size=3, max_len=12, min_len=min_len, length_penalty=length_penalty)
    batched = beam_search(dec, feats, **kw)
    assert batched == [beam_search(dec, feats[i:i + 1], **kw)[0] for i in range(len(feats))]
    assert len({tuple(c) for c in batched}) > 1  # different images, different captions
    assert all(min_len <= len(c) <= 12 for c in batched) and any(len(c) < 12 for c in batched)
    assert beam_search(dec, feats, beam_size=1, max_len=12, min_len=min_len) == \
        greedy_decode(dec, feats, max_len=12, min_len=min_len)


def test_cpu_bf16_autocast_keeps_the_lstm_state_in_fp32():
    """Under CPU bf16 autocast (trainer.precision=auto on bf16 hardware) the matmuls run in bf16 but the state is
    updated in fp32, in teacher forcing and decoding alike: both stay close to fp32, and decoding reproduces
    teacher forcing."""
    dec, feats = _trained()
    caps = captions([1, 3, 6, 4, 2, 5, 7, 1], L=9)
    with torch.no_grad():
        reference = dec(feats, caps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = dec(feats, caps)
            state = dec.init_state(feats)
            for t in range(caps.shape[1] - 1):
                logits, state = dec.step(caps[:, t], state)
            out = beam_search(dec, feats, beam_size=3, max_len=10)
    assert state["h"].dtype == state["c"].dtype == torch.float32
    scale = reference.abs().max()
    assert (low.float() - reference).abs().max() < 0.05 * scale
    assert (logits.float() - low[:, -1].float()).abs().max() < 0.02 * scale
    assert len(out) == len(feats) and all(len(c) <= 10 for c in out)


# -- the model: regulariser, overfitting, config, checkpoint -----------------------------------------------------

VOCAB = {"itos": ["<pad>", "<sos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(10)]}
SMALL = {"_target_": "captioner.decoders.ShowAttendTellDecoder", "_partial_": True, "embed_dim": 16,
         "hidden_dim": 32, "memory_dim": 32, "dropout": 0.0,
         "attention": {"_target_": "captioner.decoders.SoftAttention", "_partial_": True, "attention_dim": 16}}


def sat_module(alpha_c: float, seed: int = 0):
    from captioner.modules import AttentionCaptioner

    torch.manual_seed(seed)
    return AttentionCaptioner(alpha_c=alpha_c, vocab=VOCAB, decoder=SMALL, encoder={"name": "efficientnet_lite0"},
                              feature_dim=8, grid=(2, 2))


def test_the_doubly_stochastic_regulariser_is_applied():
    feats = torch.randn(2, 4, 8)
    caps = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 7, 8, 2]])
    index = torch.tensor([0, 1])
    off, on = sat_module(0.0), sat_module(1.0)
    on.load_state_dict(off.state_dict())
    off.eval(), on.eval()
    assert torch.equal(off.training_loss(feats, caps, index), off.caption_loss(feats, caps, index))
    loss = on.training_loss(feats, caps, index)
    assert loss > off.training_loss(feats, caps, index)  # an untrained model does not cover every token once
    _, att = on.decoder(feats, caps, index, return_attention=True)
    penalty = doubly_stochastic_reference(att, caps, PAD)
    assert 0 < penalty < 1  # a mean over tokens: on the scale of one word's cross-entropy, not 4 times it
    assert float(loss) == pytest.approx(float(on.caption_loss(feats, caps, index)) + penalty, rel=1e-5)
    loss.backward()  # the term reaches the attention's parameters
    assert on.decoder.attention.key.weight.grad.abs().sum() > 0


def test_a_tiny_sat_overfits_a_few_images():
    """8 images, each with its own 6-word caption: the decoder must learn to read the image through attention."""
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(vocab_size=V, feature_dim=D, grid=GRID, embed_dim=16, hidden_dim=32, memory_dim=32,
                                dropout=0.0, attention=ATTENTIONS["soft"])
    feats = features(8, seed=1)
    words = torch.stack([torch.randperm(V - 4)[:6] + 4 for _ in range(8)])
    caps = torch.cat([torch.full((8, 1), SOS), words, torch.full((8, 1), EOS)], dim=1)
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(dec(feats, caps).flatten(0, 1), caps[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    dec.eval()
    assert greedy_decode(dec, feats, max_len=10) == words.tolist()


def test_the_variant_config_composes_and_passes_the_schema():
    from captioner.config import compose, variants
    from captioner.training import check_config

    cfg = compose(["model=dino_sat"])
    check_config(cfg)
    assert variants()[-1] == "dino_sat" and cfg.model.variant == 6 and cfg.model.name == "dino_sat"
    assert cfg.model._target_ == "captioner.modules.AttentionCaptioner" and cfg.model.alpha_c == 1.0
    assert cfg.encoder.name == "efficientnet_lite0"  # experiment=shapes_offline swaps the encoder in
    assert cfg.decoder._target_ == "captioner.decoders.ShowAttendTellDecoder"
    assert cfg.decoder.attention._target_ == "captioner.decoders.SoftAttention"
    check_config(compose(["model=dino_sat", "attention=mha"]))  # the other mechanism composes too
    check_config(compose(["model=dino_attention", "attention=soft"]))


@pytest.mark.parametrize("overrides, named", [
    (["attention=mha", "attention.num_heads=3"], ["decoder.memory_dim=512", "attention.num_heads=3"]),
    (["attention.attention_dim=0"], ["decoder.attention.attention_dim=0", "an integer >= 1"]),
    (["decoder.memory_dim=0"], ["decoder.memory_dim=0", "an integer >= 1"]),
    (["+attention.atention_dim=8"], ["attention.atention_dim", "did you mean"]),
])
def test_settings_that_cannot_work_are_refused_by_the_schema(overrides, named):
    from captioner.config import compose
    from captioner.errors import ConfigError
    from captioner.training import check_config

    with pytest.raises(ConfigError) as e:
        check_config(compose(["model=dino_sat", *overrides]))
    assert all(text in str(e.value) for text in named), str(e.value)


def test_a_checkpoint_with_a_nested_attention_spec_loads(tmp_path):
    from captioner.checkpoint import CheckpointError, load_captioner

    module = sat_module(1.0)
    path = tmp_path / "sat.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    loaded = load_captioner(path)
    assert type(loaded.decoder) is ShowAttendTellDecoder and isinstance(loaded.decoder.attention, SoftAttention)
    assert loaded.alpha_c == 1.0
    feats = torch.randn(2, 4, 8)
    assert loaded.generate(feats) == module.eval().generate(feats)
    (maps,) = loaded.attention_maps(feats[:1], [["w0", "w1"]])
    assert maps.shape == (2, 2, 2)
    # an edited size is caught against the state dict, naming the setting
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["decoder"]["memory_dim"] = 48
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match="memory_dim"):
        load_captioner(tmp_path / "edited.ckpt")


# -- end to end ----------------------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_train_dino_sat_tiny_then_caption_with_attention_maps(tiny_root, tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    r = run_here(["train.py", "model=dino_sat", "debug=tiny", f"hydra.run.dir={run_dir}"], tiny_root)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["model"] == "dino_sat" and m["family"] == "attention" and m["encoder"] == "efficientnet_lite0"
    samples = json.loads((run_dir / "attention_maps.json").read_text())
    assert len(samples) == 4
    for s in samples:
        maps = torch.tensor(s["maps"]).view(len(s["words"]), -1)
        assert maps.shape[1] == 49 and (maps >= 0).all()
        torch.testing.assert_close(maps.sum(1), torch.ones(len(s["words"])), rtol=0, atol=1e-3)

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (120, 90), (200, 30, 30)).save(images / "red.png")
    maps = tmp_path / "maps"
    r = run_here(["-m", "captioner.caption", "--ckpt", m["best_checkpoint"], str(images), "--json", "--beam-size", "2",
                 "--attention-maps", str(maps)], tiny_root)
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    with Image.open(row["attention_map"]) as im:
        assert im.format == "PNG" and im.size[0] > 200
