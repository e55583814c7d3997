"""Tests of the word decoders (captioner.decoders): one interface, checked for every decoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioner.data.vocabulary import Vocabulary
from captioner.config import options
from captioner.decoders import LSTMInitDecoder, TransformerDecoder
from captioner.decoding import greedy_decode
from captioner.modules import build_part

PAD, SOS, EOS = Vocabulary.pad_id, Vocabulary.sos_id, Vocabulary.eos_id
V, D, GRID = 24, 32, (2, 3)  # 4 specials + 20 words; a 2x3 grid of 32-dim image tokens
NAMES = options("decoder")
ATTENTION = {"transformer": "mha", "show_attend_tell": "soft"}  # the spatial decoders and the mechanism each uses


def decoder_factory(name: str):
    """The decoder of conf/decoder/<name>.yaml as training builds it (a partial), with the attention of its variant
    (conf/attention/) where it attends."""
    from captioner.config import compose
    from omegaconf import OmegaConf

    attention = [f"attention={ATTENTION[name]}"] if name in ATTENTION else []
    return build_part(OmegaConf.to_container(compose([f"decoder={name}", *attention]).decoder, resolve=True))


def build_decoder(name: str, **kwargs) -> torch.nn.Module:
    return decoder_factory(name)(**kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def make(name: str, **kwargs) -> torch.nn.Module:
    extra = {"grid": GRID} if name in ATTENTION else {}
    return build_decoder(name, vocab_size=V, feature_dim=D, **extra, **kwargs)


def features(decoder, B: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (B, D) if decoder.feature == "pooled" else (B, GRID[0] * GRID[1], D)
    return torch.randn(shape, generator=g)


def captions(lengths: list[int], L: int, seed: int = 0) -> torch.Tensor:
    """<sos> w1..wn <eos> <pad>.. for each length n, as one (B, L) batch."""
    g = torch.Generator().manual_seed(seed)
    caps = torch.full((len(lengths), L), PAD, dtype=torch.long)
    for i, n in enumerate(lengths):
        caps[i, 0], caps[i, n + 1] = SOS, EOS
        caps[i, 1 : n + 1] = torch.randint(4, V, (n,), generator=g)
    return caps


def stepwise(decoder, feats: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Teacher tokens fed one at a time through init_state/step -> (B, L-1, V)."""
    state, out = decoder.init_state(feats), []
    for t in range(caps.shape[1] - 1):
        logits, state = decoder.step(caps[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1)


def test_every_decoder_config_builds_a_decoder_class():
    from captioner.decoders import interface_problem

    assert set(NAMES) == {"rnn", "lstm", "lstm_init", "transformer", "show_attend_tell"}
    for name in NAMES:
        factory = decoder_factory(name)
        assert interface_problem(factory.func) is None, name
    with pytest.raises(ValueError, match="attention mechanism"):
        TransformerDecoder(vocab_size=V, feature_dim=D, grid=GRID, attention=None)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_state(name):
    torch.manual_seed(0)
    dec = make(name)
    assert dec.feature == ("spatial" if name in ATTENTION else "pooled")
    feats, caps = features(dec, 3), captions([2, 5, 0], L=8)
    assert dec(feats, caps).shape == (3, 7, V)
    state = dec.init_state(feats)
    assert state and all(x.shape[0] == 3 for x in state.values())
    logits, state = dec.step(caps[:, 0], state)
    assert logits.shape == (3, V) and all(x.shape[0] == 3 for x in state.values())


@pytest.mark.parametrize("name", NAMES)
def test_padding_never_reaches_valid_positions(name):
    torch.manual_seed(0)
    dec = make(name).eval()
    feats, caps = features(dec, 4), captions([1, 3, 6, 4], L=9)
    junk = caps.clone()
    after_eos = torch.cumsum(caps == EOS, dim=1).bool() & (caps != EOS)
    junk[after_eos] = torch.randint(4, V, (int(after_eos.sum()),))
    valid = caps[:, 1:] != PAD  # positions whose target is a word or <eos>
    a, b = dec(feats, caps), dec(feats, junk)
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-6)
    assert not torch.allclose(a[~valid], b[~valid])  # the junk did change something: the test has teeth


@pytest.mark.parametrize("name", NAMES)
def test_step_equals_teacher_forcing(name):
    torch.manual_seed(0)
    dec = make(name, num_layers=2) if name not in ATTENTION else make(name)
    dec.eval()
    feats, caps = features(dec, 4), captions([1, 3, 6, 4], L=9)
    with torch.no_grad():
        torch.testing.assert_close(stepwise(dec, feats, caps), dec(feats, caps), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_image_changes_first_word(name):
    torch.manual_seed(0)
    dec = make(name).eval()
    feats = features(dec, 2)
    logits, _ = dec.step(torch.full((2,), SOS), dec.init_state(feats))
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_image_is_the_first_input_step(name):
    """Show and Tell: init_state is the RNN after reading the projected image from a zero state."""
    torch.manual_seed(0)
    dec = make(name).eval()
    feats = features(dec, 3)
    with torch.no_grad():
        out, _ = dec.rnn(dec.image_proj(feats)[:, None])
        state = dec.init_state(feats)
    torch.testing.assert_close(state["h"][:, -1], out[:, 0])


def test_lstm_init_state_is_the_image():
    torch.manual_seed(0)
    dec = LSTMInitDecoder(vocab_size=V, feature_dim=D, num_layers=2).eval()
    assert not hasattr(dec, "image_proj")  # the inputs are words only
    feats = features(dec, 3)
    state = dec.init_state(feats)
    assert state["h"].shape == state["c"].shape == (3, 2, dec.hidden_dim)
    assert (state["h"][0] - state["h"][1]).abs().max() > 1e-3 and (state["c"][0] - state["c"][1]).abs().max() > 1e-3
    assert state["h"].abs().max() < 1  # tanh


def test_transformer_sees_token_positions():
    """Swapping two grid cells must change the output: without 2-D positions it could not ("left of")."""
    torch.manual_seed(0)
    for encoder_layers in (2, 0):
        dec = TransformerDecoder(vocab_size=V, feature_dim=D, grid=GRID, encoder_layers=encoder_layers).eval()
        feats, caps = features(dec, 2), captions([3, 4], L=6)
        swapped = feats.clone()
        swapped[:, [0, 5]] = feats[:, [5, 0]]
        with torch.no_grad():
            assert (dec(feats, caps) - dec(swapped, caps)).abs().max() > 1e-4
            # Control: with the position embeddings off, the same swap changes nothing.
            dec.row_pos.zero_(), dec.col_pos.zero_()
            torch.testing.assert_close(dec(feats, caps), dec(swapped, caps), rtol=0, atol=1e-5)


def test_transformer_rejects_wrong_grid():
    dec = TransformerDecoder(vocab_size=V, feature_dim=D, grid=(7, 7))
    with pytest.raises(ValueError, match="grid"):
        dec.init_state(torch.randn(2, 6, D))


def test_transformer_returns_cross_attention():
    torch.manual_seed(0)
    dec = TransformerDecoder(vocab_size=V, feature_dim=D, grid=GRID).eval()
    feats, tokens = features(dec, 3), torch.full((3,), SOS)
    with torch.no_grad():
        logits, state, attn = dec.step(tokens, dec.init_state(feats), return_attention=True)
        plain, _ = dec.step(tokens, dec.init_state(feats))
        _, _, attn2 = dec.step(torch.tensor([5, 6, 7]), state, return_attention=True)
    for a in (attn, attn2):
        assert a.shape == (3, GRID[0] * GRID[1]) and (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(3))
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-5)


# The transformer's case takes 35 s on 2 cores: it runs with `make test-all`; in `make test`, the dino_attention
# variant's overfit (tests/test_models.py) shows the transformer learning to read real image features.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "transformer" else n for n in NAMES])
def test_overfits_a_tiny_set(name):
    """8 images, each with its own 6-word caption: the decoder must learn to read the image."""
    torch.manual_seed(0)
    dec = make(name)
    feats = features(dec, 8, seed=1)
    words = torch.stack([torch.randperm(V - 4)[:6] + 4 for _ in range(8)])  # distinct captions
    caps = torch.cat([torch.full((8, 1), SOS), words, torch.full((8, 1), EOS)], dim=1)
    opt = torch.optim.AdamW(dec.parameters(), lr=2e-3)
    first = None
    for _ in range(600):
        loss = F.cross_entropy(dec(feats, caps).flatten(0, 1), caps[:, 1:].flatten(), ignore_index=PAD)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.001 * first:
            break
    assert loss.item() < 0.1 * first
    dec.eval()
    assert greedy_decode(dec, feats, max_len=10) == words.tolist()


@pytest.mark.parametrize("name", ["rnn", "lstm", "lstm_init", "transformer", "show_attend_tell"])
def test_image_index_equals_repeating_the_features(name):
    """Batches carry each image once plus caption->image indices; that must equal repeating the features."""
    torch.manual_seed(0)
    extra = {"grid": (2, 3)} if name in ATTENTION else {}
    dec = build_decoder(name, vocab_size=20, feature_dim=8, **extra).eval()
    feats = torch.randn(3, 6, 8) if name in ATTENTION else torch.randn(3, 8)
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    caps = torch.randint(4, 20, (6, 7))
    caps[:, 0] = 1
    torch.testing.assert_close(dec(feats, caps, index), dec(feats[index], caps))


@pytest.mark.parametrize("name", ["rnn", "lstm", "lstm_init"])
def test_cpu_bf16_autocast_runs_teacher_forcing_in_bf16_and_decoding_in_fp32(name):
    """Under CPU bf16 autocast (trainer.precision=auto on a CPU with bf16 hardware) the teacher-forced recurrence
    runs in bf16 (the speed-up), close to fp32; step-wise decoding keeps an fp32 recurrent state."""
    torch.manual_seed(0)
    dec = make(name).eval()
    feats, caps = features(dec, 4), captions([1, 3, 6, 4], L=9)
    seen = []
    dec.rnn.register_forward_hook(lambda m, args, out: seen.append(out[0].dtype))
    with torch.no_grad():
        reference = dec(feats, caps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = dec(feats, caps)
            n = len(seen)
            state = dec.init_state(feats)
            _, state = dec.step(caps[:, 0], state)
    assert seen[0] == torch.float32 and seen[1] == torch.bfloat16
    assert set(seen[n:]) == {torch.float32} and state["h"].dtype == torch.float32
    scale = reference.abs().max()
    assert (low.float() - reference).abs().max() < 0.05 * scale


def test_byte_dropout_rate_expectation_and_gradient():
    from captioner.decoders.dropout import ByteDropout

    torch.manual_seed(0)
    drop = ByteDropout(0.3)
    x = torch.full((1000, 1000), 2.0, requires_grad=True)
    y = drop(x)
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    assert abs(rate - round(0.3 * 256) / 256) < 3e-3  # p rounded to 1/256 (77/256 = 0.3008)
    assert abs(y.mean().item() - 2.0) < 0.01  # kept values rescaled: the expectation is unchanged
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach() / 2.0)  # the gradient is the scaled mask itself
    drop.eval()
    assert drop(x) is x


def test_transformer_beams_share_one_copy_of_the_image_keys_values():
    """Beam search keeps cross-attention keys/values at one row per image (per_image_state); a step over G rows per
    image must equal the step over G explicit copies, attention weights included."""
    torch.manual_seed(0)
    dec = make("transformer").eval()
    feats, G = features(dec, 3), 4
    tokens = torch.randint(4, V, (3 * G,))
    with torch.no_grad():
        shared = dec.init_state(feats)
        expanded = {n: x.repeat_interleave(G, 0) for n, x in shared.items()}
        grouped = {n: (x if n.startswith(dec.per_image_state) else x.repeat_interleave(G, 0))
                   for n, x in shared.items()}
        assert grouped["cross_k.0"].shape[0] == 3 and grouped["self_k.0"].shape[0] == 3 * G
        for _ in range(3):  # a few steps, so the self-attention cache grows as well
            a, expanded, att_a = dec.step(tokens, expanded, return_attention=True)
            b, grouped, att_b = dec.step(tokens, grouped, return_attention=True)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            torch.testing.assert_close(att_a, att_b, rtol=0, atol=1e-6)
            tokens = a.argmax(-1)


def test_teacher_forced_attention_is_the_step_wise_attention():
    """`forward(..., return_attention=True)` (what the attention regulariser reads) gives the same logits as plain
    teacher forcing, and per position the cross-attention step-wise decoding reports for that word."""
    torch.manual_seed(0)
    dec = make("transformer").eval()
    feats, caps = features(dec, 3), captions([2, 5, 1], L=8)
    with torch.no_grad():
        logits, att = dec(feats, caps, return_attention=True)
        torch.testing.assert_close(logits, dec(feats, caps), rtol=0, atol=1e-5)
        state, steps = dec.init_state(feats), []
        for t in range(caps.shape[1] - 1):
            _, state, a = dec.step(caps[:, t], state, return_attention=True)
            steps.append(a)
    assert att.shape == (3, 7, GRID[0] * GRID[1])
    torch.testing.assert_close(att, torch.stack(steps, dim=1), rtol=0, atol=1e-5)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 7), rtol=0, atol=1e-5)
