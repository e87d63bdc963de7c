"""The test suite (CPU, minutes), in the files' reading order: the model and its files
(taskexpert.py), the loss (taskexpert.py) and the benchmarks' meters (data.py), the data (data.py),
training (train.py), export (export.py).

Each part builds its own small fixtures in the real formats; nothing is downloaded."""

import argparse
import contextlib
import copy
import functools
import hashlib
import http.server
import json
import math
import os
import pathlib
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import zlib

import numpy as np
import onnx
import pytest
import scipy.io
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_bipartite_matching

import data
import export
import taskexpert
import train
from data import (EDGE_TEST_NEW, EDGE_THRESHOLDS, DepthMeter, EdgeMeter, EdgePool, NormalsMeter, SaliencyMeter, SegMeter,
                  _edge_nms, _maximum_matching, _thin_lanes, delta_m, make_meters, thin)
from taskexpert import (ABLATIONS, CHECKPOINT_FORMAT, IMAGENET_MEAN, IMAGENET_STD, TASK_TABLE, TASKS, MultiTaskLoss, TaskExpert,
                        denormalise, load_pretrained, normalise, postprocess, predict, pretrained_file,
                        read_checkpoint, resample_pos_embed, save_checkpoint, save_weights, sincos_pos_embed)


# ==================================================================================================
# Model (taskexpert.py): ViT backbone, MMoE, heads, checkpoint loading
# ==================================================================================================

_MODEL_SIZE = (64, 96)  # 4x6 tokens: small enough for a CPU test, not square


def _tiny(tasks, **kw):
    torch.manual_seed(0)
    return TaskExpert(tasks, backbone='tiny', img_size=_MODEL_SIZE, expert_dim=32, **kw)


@pytest.mark.parametrize('dataset', ['nyud', 'pascal'])
def test_model_outputs_named_per_task_at_input_size(dataset):
    model = _tiny(TASKS[dataset]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, *_MODEL_SIZE))
    assert set(out) == set(TASKS[dataset])
    for task, channels in TASKS[dataset].items():
        assert out[task].shape == (2, channels, *_MODEL_SIZE)
        assert torch.isfinite(out[task]).all()


def test_model_gates_are_distributions_over_experts_and_memory():
    model = _tiny(TASKS['nyud'], num_experts=5).eval()
    with torch.no_grad():
        _, gate_weights = model.forward_with_gates(torch.randn(2, 3, *_MODEL_SIZE))
    assert len(gate_weights) == 4
    n_tokens = (_MODEL_SIZE[0] // 16) * (_MODEL_SIZE[1] // 16)
    for i, gates in enumerate(gate_weights):
        for task, g in gates.items():
            # the first MMoE has no memory yet: it weighs the 5 experts only; later ones add M_t
            assert g.shape == (2, n_tokens, 5 if i == 0 else 6)
            assert (g >= 0).all()
            torch.testing.assert_close(g.sum(-1), torch.ones(2, n_tokens))


def test_model_vit_block_adds_its_branches_to_the_residual_stream():
    """x + Attn(LN1(x)), then + MLP(LN2(.)): with both output projections zeroed a block returns its
    input exactly; with the MLP's alone, its input plus the attention branch."""
    torch.manual_seed(0)
    block, x = taskexpert.Block(192, 3, drop_path=0.0), torch.randn(2, 5, 192)
    for linear in (block.attn.proj, block.mlp.fc2):
        nn.init.zeros_(linear.weight), nn.init.zeros_(linear.bias)
    with torch.no_grad():
        assert torch.equal(block(x), x)
        nn.init.normal_(block.attn.proj.weight)
        torch.testing.assert_close(block(x), x + block.attn(block.norm1(x)))


def test_model_drop_path_keeps_the_expected_value():
    """Stochastic depth drops a sample's branch with probability p and scales the kept ones by 1 / (1 - p),
    so that the expected output is the branch (base and large train with 0.15); in eval mode, as is."""
    torch.manual_seed(0)
    x = torch.ones(20000, 1, 1)
    kept = taskexpert.drop_path(x, 0.25, True)
    assert kept.unique().tolist() == pytest.approx([0.0, 4 / 3]) and abs(kept.mean().item() - 1) < 0.02
    assert torch.equal(taskexpert.drop_path(x, 0.25, False), x)


def test_model_mmoe_reads_the_experts_and_the_memory_with_its_gate():
    """F_t = sum_e g_t,e Z_e + g_t,E+1 M_t (paper Fig. 2), written as the new memory: the memory slot's
    weight times M_t is part of each task's feature."""
    torch.manual_seed(0)
    moe = taskexpert.MMoE(['depth'], 12, num_experts=3, expert_dim=5, first=False, gate='token',
                          memory_write='replace').eval()
    x, memory = torch.randn(2, 7, 12), {'depth': torch.randn(2, 7, 5)}
    with torch.no_grad():
        new, gates = moe(x, memory)
        z = moe.expert_features(moe.experts(x).reshape(2, 7, 3, 5))  # (B, N, E, D)
    g = gates['depth']  # (B, N, E + 1)
    torch.testing.assert_close(new['depth'], (g[..., :3, None] * z).sum(2) + g[..., 3:] * memory['depth'])


def test_model_head_decodes_at_a_quarter_of_the_input_then_upsamples():
    """TaskHead: the memory's 1/16 grid, bilinear x4, the 3x3 conv at 1/4 of the input size, then to it."""
    model, seen = _tiny(TASKS['nyud']).eval(), []
    model.heads['depth'].conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2:]))
    with torch.no_grad():
        out = model(torch.randn(1, 3, *_MODEL_SIZE))
    assert seen == [(_MODEL_SIZE[0] // 4, _MODEL_SIZE[1] // 4)] and out['depth'].shape[-2:] == _MODEL_SIZE


def test_model_class_ids_break_ties_as_argmax():
    logits = torch.zeros(1, 3, 4, 5)
    logits[:, 2, 0, 0] = 1.0
    ids = taskexpert.class_ids(logits, (8, 10))
    assert torch.equal(ids, F.interpolate(logits, size=(8, 10), mode='bilinear').argmax(1).int())
    assert (ids[0, 4:, 4:] == 0).all()  # a three-way tie away from the corner: the first class


def test_model_samples_are_independent():
    model = _tiny(TASKS['pascal']).eval()  # eval: BatchNorm uses running stats, no batch coupling
    x = torch.randn(3, 3, *_MODEL_SIZE)
    with torch.no_grad():
        a = model(x)
        x[1] += 1.0
        b = model(x)
    for task in a:
        assert torch.equal(a[task][0], b[task][0]) and torch.equal(a[task][2], b[task][2])
        assert not torch.allclose(a[task][1], b[task][1])


@pytest.mark.parametrize('opts', [
    dict(gate='image'), dict(memory_write='add'), dict(num_experts=2), dict(taps=(2, 12)), dict(drop_path=0.1),
    dict(ablation='no-memory'), dict(ablation='static'),
])
def test_model_every_option_runs_forward_and_backward(opts):
    model = _tiny(TASKS['nyud'], **opts).train()
    out = model(torch.randn(2, 3, *_MODEL_SIZE))
    sum(o.float().mean() for o in out.values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f'{name} got no gradient'


def test_model_blocks_after_the_last_tap_are_frozen_and_not_run():
    model = _tiny(TASKS['nyud'], taps=(2, 6)).train()
    ran = []
    for i, blk in enumerate(model.backbone.blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: ran.append(i + 1))
    out = model(torch.randn(2, 3, *_MODEL_SIZE))
    sum(o.float().mean() for o in out.values()).backward()
    assert ran == [1, 2, 3, 4, 5, 6]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {n.split('.')[2] for n in frozen if n.startswith('backbone.blocks.')} == {str(i) for i in range(6, 12)}
    assert all(p.grad is not None for n, p in model.named_parameters() if n not in frozen)  # DDP needs this
    assert 'backbone.blocks.11.mlp.fc2.weight' in model.state_dict()  # ImageNet checkpoints still load strictly


@pytest.mark.parametrize('autocast', [False, True])
def test_model_grad_checkpoint_gives_the_same_step(autocast):
    """Recomputation in backward, drop-path masks included, changes memory only: same outputs and
    gradients, and the heads' BatchNorm statistics are updated once."""
    x = torch.randn(2, 3, *_MODEL_SIZE)
    runs = []
    for mode in ('off', 'mmoe', 'all'):
        model = _tiny(TASKS['nyud'], drop_path=0.2, grad_checkpoint=mode).train()
        torch.manual_seed(1)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        sum(o.float().mean() for o in out.values()).backward()
        runs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                     {n: b.clone() for n, b in model.named_buffers()}))
    for out, grads, buffers in runs[1:]:
        for t in out:
            torch.testing.assert_close(out[t], runs[0][0][t], rtol=0, atol=0)
        assert grads.keys() == runs[0][1].keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, runs[0][1][n], rtol=1e-5, atol=1e-7)
        for n, b in buffers.items():
            torch.testing.assert_close(b, runs[0][2][n], rtol=0, atol=0)


def test_model_mmoe_saves_expert_features_once_in_low_precision():
    """Under autocast, an MMoE keeps for backward W_e X_l and Z_e in low precision, once for all T
    tasks (not again in fp32 around LayerNorm and GELU, nor cast once per task), and one copy of the
    gates' input [X_l ; mean(X_l)]."""
    mmoe = _tiny(TASKS['nyud']).mmoe[1].train()  # a tap with memory
    B, N, C, E, D = 2, 24, 192, mmoe.E, mmoe.D
    memory = {t: torch.randn(B, N, D, dtype=torch.bfloat16) for t in TASKS['nyud']}
    saved = {}  # storage -> (elements, dtype)

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes() // t.element_size(), t.dtype)
        return t

    with torch.autocast('cpu', dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        new_memory, _ = mmoe(torch.randn(B, N, C), memory)
    assert [d for n, d in saved.values() if n == B * N * E * D] == [torch.bfloat16] * 2, saved
    assert [d for n, d in saved.values() if n == B * N * 2 * C] == [torch.bfloat16], saved
    assert all(m.dtype == torch.bfloat16 for m in new_memory.values())


def test_model_ablations_remove_what_they_name():
    models = {a: _tiny(TASKS['nyud'], num_experts=5, ablation=a).eval() for a in ABLATIONS}
    with torch.no_grad():
        gates = {a: m.forward_with_gates(torch.randn(2, 3, *_MODEL_SIZE))[1] for a, m in models.items()}
    full, no_memory, static = models['none'], models['no-memory'], models['static']
    # no memory: one MMoE, at the last tap, its gates weigh the 5 experts only; static: no gates at all
    assert full.taps == (3, 6, 9, 12) and no_memory.taps == static.taps == (12,)
    assert [g['depth'].shape for g in gates['no-memory']] == [(2, 24, 5)] and gates['static'] == [{}]
    n_params = {a: sum(p.numel() for p in m.parameters()) for a, m in models.items()}
    gate_params = sum(p.numel() for p in no_memory.mmoe[0].gates.parameters())
    assert n_params['static'] == n_params['no-memory'] - gate_params and n_params['no-memory'] < n_params['none']
    # static = the same experts under fixed uniform gates, one feature shared by every task
    moe, mean = no_memory.mmoe[0], static.mmoe[0]
    mean.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith('gates.')})
    with torch.no_grad():
        for gate in moe.gates.values():  # zero logits: softmax = 1/E
            gate.weight.zero_(), gate.bias.zero_()
        x = torch.randn(2, 24, 192)
        expected, shared = moe(x, None)[0], mean(x, None)[0]
    for task in TASKS['nyud']:
        torch.testing.assert_close(shared[task], expected[task])
        assert shared[task] is shared['semseg']


def test_model_predictions_are_fp32_under_bf16_autocast_at_any_size():
    """Under bf16 autocast the heads' last conv and the upsampling run in fp32: the loss, the meters and
    the saved files see fp32 maps (a bf16 depth keeps 8 bits: 3 m +- 0.012 m), close to the fp32 model's.
    At an input size other than the training size the position embedding is resampled for the call."""
    model = _tiny(TASKS['nyud']).eval()
    x = torch.randn(1, 3, 80, 48)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
    for t, c in TASKS['nyud'].items():
        assert out[t].dtype == torch.float32 and out[t].shape == (1, c, 80, 48), t
        torch.testing.assert_close(out[t], ref[t], rtol=0, atol=0.05 * ref[t].abs().max().item())
        assert not torch.equal(out[t], out[t].to(torch.bfloat16).float()), t  # more than bf16's 8 bits
    # the resampled position embedding is the one a model of that training size would hold
    at_80x48 = copy.deepcopy(model)
    taskexpert.set_grid(at_80x48.backbone, (5, 3))
    with torch.no_grad():
        torch.testing.assert_close(at_80x48(x)['depth'], ref['depth'])


def test_model_last_mmoe_reads_the_final_layernorm(tmp_path):
    """As the authors' ViT taps (InvPT vit.py: x = self.norm(x)[:, 1:]): the last MMoE reads the final
    LayerNorm's output, the earlier ones the raw block outputs; the LayerNorm is trained, and a timm
    checkpoint still loads strictly, its `norm` included."""
    model = _tiny(TASKS['nyud']).train()
    blocks, normed, read = {}, [], []
    for i in (2, 5, 8, 11):
        model.backbone.blocks[i].register_forward_hook(lambda m, a, o, i=i: blocks.__setitem__(i, o[:, 1:]))
    model.backbone.norm.register_forward_hook(lambda m, a, o: normed.append(o))
    for moe in model.mmoe:
        moe.register_forward_pre_hook(lambda m, a: read.append(a[0]))
    out = model(torch.randn(2, 3, *_MODEL_SIZE))
    for i, x in zip((2, 5, 8), read[:3]):
        assert torch.equal(x, blocks[i])
    torch.testing.assert_close(read[3], F.layer_norm(blocks[11], (192,), model.backbone.norm.weight,
                                                     model.backbone.norm.bias, eps=1e-6))
    assert len(normed) == 1 and read[3] is normed[0] and not torch.allclose(read[3], blocks[11])
    sum(o.float().mean() for o in out.values()).backward()
    assert model.backbone.norm.weight.requires_grad and model.backbone.norm.weight.grad.abs().sum() > 0
    sd = _timm_layout_checkpoint(model)
    sd['norm.weight'] = torch.full((192,), 3.0)
    torch.save(sd, tmp_path / 'vit.pth')
    load_pretrained(model, str(tmp_path / 'vit.pth'))
    assert torch.equal(model.backbone.norm.weight, sd['norm.weight'])
    del sd['norm.weight']
    torch.save(sd, tmp_path / 'vit.pth')
    with pytest.raises(KeyError, match=r'norm\.weight'):
        load_pretrained(model, str(tmp_path / 'vit.pth'))


def _timm_layout_checkpoint(model, grid=(24, 24)):
    """A state dict as timm saves vit_tiny_patch16_384: classifier head, 24x24+1 position embedding."""
    sd = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    sd['pos_embed'] = torch.randn(1, 1 + grid[0] * grid[1], sd['cls_token'].shape[-1])
    sd['head.weight'], sd['head.bias'] = torch.randn(1000, 192), torch.randn(1000)
    return sd


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_model_loads_timm_checkpoint_and_resamples_pos_embed(tmp_path, suffix):
    src = _tiny(TASKS['nyud'])
    sd = _timm_layout_checkpoint(src)
    path = str(tmp_path / f'vit{suffix}')
    if suffix == '.safetensors':
        from safetensors.torch import save_file
        save_file(sd, path)
    else:  # hub checkpoints are often wrapped and carry DDP / compile prefixes
        torch.save({'model': {'module._orig_mod.' + k: v for k, v in sd.items()}}, path)
    model = TaskExpert(TASKS['nyud'], backbone='tiny', img_size=_MODEL_SIZE, expert_dim=32)
    load_pretrained(model, path)
    got = model.backbone.state_dict()
    torch.testing.assert_close(got['blocks.11.mlp.fc2.weight'], sd['blocks.11.mlp.fc2.weight'])
    assert got['pos_embed'].shape == (1, 1 + 4 * 6, 192)
    torch.testing.assert_close(got['pos_embed'], resample_pos_embed(sd['pos_embed'], (4, 6)))
    torch.testing.assert_close(got['pos_embed'][:, 0], sd['pos_embed'][:, 0])  # class token slot kept


def test_model_checkpoint_with_missing_or_misshapen_key_fails_clearly(tmp_path):
    model = _tiny(TASKS['nyud'])
    sd = _timm_layout_checkpoint(model)
    del sd['blocks.3.attn.qkv.bias']
    torch.save(sd, tmp_path / 'missing.pth')
    with pytest.raises(KeyError, match=r'blocks\.3\.attn\.qkv\.bias'):
        load_pretrained(model, str(tmp_path / 'missing.pth'))
    sd = _timm_layout_checkpoint(model)
    sd['blocks.0.mlp.fc1.weight'] = torch.randn(10, 192)
    torch.save(sd, tmp_path / 'shape.pth')
    with pytest.raises(ValueError, match=r'blocks\.0\.mlp\.fc1\.weight'):
        load_pretrained(model, str(tmp_path / 'shape.pth'))


@contextlib.contextmanager
def _serving(folder):
    """A local HTTP server of `folder`'s files, in a thread: the hub at HF_ENDPOINT, without a network."""
    handler = functools.partial(_QuietFiles, directory=str(folder))
    with http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f'http://127.0.0.1:{server.server_address[1]}'
        finally:
            server.shutdown()


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _closed_port_url():
    """The address of a port nothing listens on: a hub out of reach."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return f'http://127.0.0.1:{s.getsockname()[1]}'


_HUB_NAME = 'vit_tiny_patch16_384.augreg_in21k_ft_in1k'


def test_model_pretrained_hub_id_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    """A hub id (a bare timm name is timm/<name>) is fetched from HF_ENDPOINT/<repo>/resolve/main/
    model.safetensors once, into torch's hub cache; offline, one line says how to fetch it by hand."""
    src = _tiny(TASKS['nyud'])
    from safetensors.torch import save_file
    for repo in (f'timm/{_HUB_NAME}', 'someone/my_vit'):
        (tmp_path / 'hub' / repo / 'resolve' / 'main').mkdir(parents=True)
        save_file(_timm_layout_checkpoint(src), str(tmp_path / 'hub' / repo / 'resolve' / 'main' / 'model.safetensors'))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    cache = tmp_path / 'torch' / 'hub' / 'checkpoints'
    model = TaskExpert(TASKS['nyud'], backbone='tiny', img_size=_MODEL_SIZE, expert_dim=32)
    with _serving(tmp_path / 'hub') as url:
        monkeypatch.setenv('HF_ENDPOINT', url)
        load_pretrained(model, _HUB_NAME)
        assert pretrained_file('someone/my_vit') == str(cache / 'someone--my_vit.safetensors')
    torch.testing.assert_close(model.backbone.blocks[11].mlp.fc2.weight, src.backbone.blocks[11].mlp.fc2.weight)
    assert sorted(os.listdir(cache)) == ['someone--my_vit.safetensors', f'timm--{_HUB_NAME}.safetensors']
    monkeypatch.setenv('HF_ENDPOINT', _closed_port_url())  # offline now: the cache answers
    assert pretrained_file(_HUB_NAME) == str(cache / f'timm--{_HUB_NAME}.safetensors')
    with pytest.raises(FileNotFoundError, match='file not found'):  # a path is not a hub id: nothing fetched
        pretrained_file(str(tmp_path / 'vit_large_patch16_384.pth'))
    other = 'vit_small_patch16_384.augreg_in21k_ft_in1k'
    with pytest.raises(FileNotFoundError) as offline:
        pretrained_file(other)
    msg = str(offline.value)
    assert f'curl -L -o {other}.safetensors http://127.0.0.1:' in msg and f'--pretrained {other}.safetensors' in msg
    assert 'URLError' in msg and '\n' not in msg, msg
    assert len(os.listdir(cache)) == 2  # no partial download left behind


def test_model_predict_any_image_size_post_processed(tmp_path):
    model = _tiny(TASKS['nyud']).eval()
    rgb = np.random.default_rng(0).integers(0, 256, (*_MODEL_SIZE, 3), dtype=np.uint8)
    # at the network size: the plain forward pass, post-processed as the exported models are
    got = predict(model, rgb)
    with torch.no_grad():
        ref = postprocess(model(data.to_tensors({'image': rgb}, _MODEL_SIZE)['image'][None]))
    assert list(got) == list(TASKS['nyud'])
    for name, r in ref.items():
        np.testing.assert_array_equal(got[name], r[0].numpy())
    # larger than the network (shrunk to fit, then back) and smaller (padded): maps at the image's size
    for h, w in ((100, 150), (40, 30)):
        out = predict(model, Image.fromarray(rgb).resize((w, h)), probabilities=True)
        assert out['semseg'].shape == (h, w) and out['semseg'].dtype == np.int32
        assert out['semseg_prob'].shape == (40, h, w) and (out['semseg'] == out['semseg_prob'].argmax(0)).all()
        assert out['depth'].shape == out['edge'].shape == (1, h, w) and out['normals'].shape == (3, h, w)
        np.testing.assert_allclose(np.linalg.norm(out['normals'], axis=0), 1, atol=1e-5)
        assert 0 <= out['edge'].min() and out['edge'].max() <= 1
    with pytest.raises(ValueError, match='uint8'):
        predict(model, rgb.astype(np.float32))


def test_model_normalisation_and_its_inverse_are_exact_on_8_bit_frames():
    """Every 8-bit value of every channel: normalise is ImageNet's (x / 255 - mean) / std, and
    denormalise gives the frame back exactly (the panels and export.py's metric change rely on it)."""
    rgb = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1, 1)  # (2, 3, 1, 256)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = normalise(rgb)
    assert x.dtype == torch.float32 and x.shape == rgb.shape
    torch.testing.assert_close(x, (rgb.double() / 255 - mean.double()) / std.double(), rtol=0, atol=1e-6,
                               check_dtype=False)
    assert torch.equal(denormalise(x), rgb.float())


def test_model_loads_google_npz(tmp_path):
    """Google's .npz layout (HWIO conv, per-head q/k/v kernels) gives the same network as timm's."""
    import numpy as np
    src = _tiny(TASKS['nyud'])
    sd = {k: v.numpy() for k, v in _timm_layout_checkpoint(src).items()}
    C, H = 192, 3
    w = {'embedding/kernel': sd['patch_embed.proj.weight'].transpose(2, 3, 1, 0),
         'embedding/bias': sd['patch_embed.proj.bias'], 'cls': sd['cls_token'],
         'Transformer/posembed_input/pos_embedding': sd['pos_embed'],
         'Transformer/encoder_norm/scale': sd['norm.weight'], 'Transformer/encoder_norm/bias': sd['norm.bias']}
    for i in range(12):
        p, q = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
        att = p + 'MultiHeadDotProductAttention_1/'
        w[p + 'LayerNorm_0/scale'], w[p + 'LayerNorm_0/bias'] = sd[q + 'norm1.weight'], sd[q + 'norm1.bias']
        w[p + 'LayerNorm_2/scale'], w[p + 'LayerNorm_2/bias'] = sd[q + 'norm2.weight'], sd[q + 'norm2.bias']
        for j, n in enumerate(('query', 'key', 'value')):
            w[att + n + '/kernel'] = sd[q + 'attn.qkv.weight'][j * C:(j + 1) * C].T.reshape(C, H, C // H)
            w[att + n + '/bias'] = sd[q + 'attn.qkv.bias'][j * C:(j + 1) * C].reshape(H, C // H)
        w[att + 'out/kernel'] = sd[q + 'attn.proj.weight'].T.reshape(H, C // H, C)
        w[att + 'out/bias'] = sd[q + 'attn.proj.bias']
        for j in (0, 1):
            w[p + f'MlpBlock_3/Dense_{j}/kernel'] = sd[q + f'mlp.fc{j + 1}.weight'].T
            w[p + f'MlpBlock_3/Dense_{j}/bias'] = sd[q + f'mlp.fc{j + 1}.bias']
    np.savez(tmp_path / 'vit.npz', **w)
    model = TaskExpert(TASKS['nyud'], backbone='tiny', img_size=_MODEL_SIZE, expert_dim=32)
    load_pretrained(model, str(tmp_path / 'vit.npz'))
    for k, v in model.backbone.state_dict().items():
        want = torch.from_numpy(sd[k]) if k != 'pos_embed' else resample_pos_embed(torch.from_numpy(sd[k]), (4, 6))
        torch.testing.assert_close(v, want, msg=k)


def test_model_from_scratch_starts_with_sincos_positions():
    # token (row 1, column 2) of a 2x3 grid, 8 channels = 2 frequencies (1, 1/100) x sin/cos x row/column
    want = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    torch.testing.assert_close(sincos_pos_embed((2, 3), 8)[5], torch.tensor(want))
    vit = TaskExpert(TASKS['nyud'], 'tiny', (32, 48)).backbone
    torch.testing.assert_close(vit.pos_embed.data[0, 1:], sincos_pos_embed((2, 3), 192))
    assert vit.pos_embed.requires_grad  # a start, still learnt


def test_model_rejects_bad_options():
    with pytest.raises(ValueError, match='divisible by 16'):
        TaskExpert(TASKS['nyud'], backbone='tiny', img_size=(100, 96))
    with pytest.raises(ValueError, match='backbone huge: choose one of tiny, small, base, large'):
        TaskExpert(TASKS['nyud'], backbone='huge')
    with pytest.raises(ValueError, match='taps'):
        TaskExpert(TASKS['nyud'], backbone='tiny', taps=(3, 13))
    with pytest.raises(ValueError, match='ablation no-gates: must be one of none, no-memory, static'):
        TaskExpert(TASKS['nyud'], backbone='tiny', ablation='no-gates')
    with pytest.raises(ValueError, match='taps 3 12: an ablated model .* has one MMoE: give one tap'):
        TaskExpert(TASKS['nyud'], backbone='tiny', taps=(3, 12), ablation='static')


# ---- the model against independent references: hand computations in numpy, float64 ---------------
# Written from the definitions (timm's ViT arithmetic, the MMoE and TaskHead docstrings, PIL's bicubic
# filter), never through the modules' own code path: a wrong permute, eps, GELU or order fails them.

def _ref_params(module):
    """A module's parameters and buffers as float64 numpy arrays, by state-dict name."""
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def _ref_layer_norm(x, weight, bias, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * weight + bias


def _ref_gelu(x):  # the exact GELU, x Phi(x)
    return 0.5 * x * (1 + scipy.special.erf(x / math.sqrt(2)))


def _ref_softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ref_attention(x, p, heads):
    """timm's fused qkv: output channels [q | k | v], each split into heads of C / heads contiguous
    channels; per head softmax(q k^T / sqrt(d)) v; the heads concatenated in order, then projected."""
    B, N, C = x.shape
    d = C // heads
    qkv = x @ p['qkv.weight'].T + p['qkv.bias']  # (B, N, 3C)
    out = np.zeros((B, N, C))
    for b in range(B):
        for h in range(heads):
            q, k, v = (qkv[b, :, s * C + h * d:s * C + (h + 1) * d] for s in range(3))  # each (N, d)
            out[b, :, h * d:(h + 1) * d] = _ref_softmax(q @ k.T / math.sqrt(d)) @ v
    return out @ p['proj.weight'].T + p['proj.bias']


def _ref_block(x, p, heads):
    """Pre-norm: x + Attn(LN1(x)), then + fc2(GELU(fc1(LN2(.)))); both LayerNorms with eps 1e-6."""
    x = x + _ref_attention(_ref_layer_norm(x, p['norm1.weight'], p['norm1.bias'], 1e-6),
                           {k[5:]: v for k, v in p.items() if k.startswith('attn.')}, heads)
    h = _ref_layer_norm(x, p['norm2.weight'], p['norm2.bias'], 1e-6)
    return x + _ref_gelu(h @ p['mlp.fc1.weight'].T + p['mlp.fc1.bias']) @ p['mlp.fc2.weight'].T + p['mlp.fc2.bias']


def _ref_mmoe(x, p, memory, E, D, gate, memory_write):
    """Z_e = GELU(LN_e(W_e X)) with each expert's own affine; g_t = softmax(W_t [X ; mean_N X] + b_t)
    per token (gate 'image': of the mean over tokens of those logits); F_t = sum_e g_t,e Z_e (+ g_t,E+1 M_t,
    + M_t for 'add')."""
    B, N, C = x.shape
    h = x @ p['experts.weight'].T + p['experts.bias']  # (B, N, E*D): expert e is channels e*D..(e+1)*D
    z = [_ref_gelu(_ref_layer_norm(h[..., e * D:(e + 1) * D], p['expert_norm_weight'][e], p['expert_norm_bias'][e],
                                   1e-6)) for e in range(E)]
    context = np.concatenate([x, np.broadcast_to(x.mean(1, keepdims=True), x.shape)], -1)  # (B, N, 2C)
    new, gates = {}, {}
    for t in sorted({k.split('.')[1] for k in p if k.startswith('gates.')}):
        logits = context @ p[f'gates.{t}.weight'].T + p[f'gates.{t}.bias']  # (B, N, E[+1])
        if gate == 'image':
            logits = np.broadcast_to(logits.mean(1, keepdims=True), logits.shape)
        g = _ref_softmax(logits)
        f = sum(g[..., e:e + 1] * z[e] for e in range(E))
        if memory is not None:
            f = f + g[..., E:E + 1] * memory[t] + (memory[t] if memory_write == 'add' else 0)
        new[t], gates[t] = f, g
    return new, gates


def _ref_bilinear_matrix(n_in, n_out):
    """Rows: the weights of bilinear resizing (half-pixel centres, edge clamped), one output pixel each."""
    M = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(src)
        M[i, i0] += 1 - (src - i0)
        M[i, min(i0 + 1, n_in - 1)] += src - i0
    return M


def _ref_resize_bilinear(x, size):  # x (B, C, h, w)
    return np.einsum('Hh,bchw,Ww->bcHW', _ref_bilinear_matrix(x.shape[2], size[0]), x,
                     _ref_bilinear_matrix(x.shape[3], size[1]))


def _ref_head(m, p, grid, size):
    """Token n = (row n // w, column n % w) -> bilinear x4 -> 3x3 conv (zero padding, no bias) -> BN
    (running statistics, eps 1e-5) -> GELU -> 1x1 conv -> bilinear to size."""
    B, N, D = m.shape
    x = _ref_resize_bilinear(m.reshape(B, *grid, D).transpose(0, 3, 1, 2), (4 * grid[0], 4 * grid[1]))
    pad, (h, w) = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), x.shape[2:]
    x = sum(np.einsum('oc,bchw->bohw', p['conv.weight'][:, :, i, j], pad[:, :, i:i + h, j:j + w])
            for i in range(3) for j in range(3))
    bn = [p['bn.' + k][:, None, None] for k in ('running_mean', 'running_var', 'weight', 'bias')]
    x = _ref_gelu((x - bn[0]) / np.sqrt(bn[1] + 1e-5) * bn[2] + bn[3])
    x = np.einsum('oc,bchw->bohw', p['pred.weight'][:, :, 0, 0], x) + p['pred.bias'][:, None, None]
    return _ref_resize_bilinear(x, size)


def _ref_taskexpert(model, image):
    """The whole forward pass of an eval-mode TaskExpert, by hand -> (outputs, gate weights per tap)."""
    vit = model.backbone
    p = _ref_params(vit)
    x = image.double().numpy()
    B, _, H, W = x.shape
    grid, heads, C = (H // 16, W // 16), vit.blocks[0].attn.num_heads, vit.cls_token.shape[-1]
    # 16x16 patches, row by row, each flattened as the conv weight (channel, y, x)
    patches = x.reshape(B, 3, grid[0], 16, grid[1], 16).transpose(0, 2, 4, 1, 3, 5).reshape(B, -1, 3 * 256)
    tokens = patches @ p['patch_embed.proj.weight'].reshape(C, -1).T + p['patch_embed.proj.bias']  # (B, N, C)
    x = np.concatenate([np.broadcast_to(p['cls_token'], (B, 1, C)), tokens], 1) + p['pos_embed']  # (B, 1 + N, C)
    tapped = []
    for l in range(1, max(model.taps) + 1):  # the taps are 1-based block numbers
        x = _ref_block(x, _ref_params(vit.blocks[l - 1]), heads)
        if l in model.taps:
            tapped.append(x[:, 1:])
    tapped[-1] = _ref_layer_norm(tapped[-1], p['norm.weight'], p['norm.bias'], 1e-6)  # the last tap only
    memory, gates = None, []
    for moe, x_l in zip(model.mmoe, tapped):  # the memory passed on from one MMoE to the next
        memory, g = _ref_mmoe(x_l, _ref_params(moe), memory, moe.E, moe.D, moe.gate_mode, moe.memory_write)
        gates.append(g)
    return {t: _ref_head(memory[t], _ref_params(head), grid, (H, W)) for t, head in model.heads.items()}, gates


def _randomise(module, seed, scale=0.5):
    """Every parameter and buffer of a module drawn at random (variances positive), so that no weight
    is a 0 or 1 a mistake could hide behind."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith('running_var')
                        else torch.randn(t.shape, generator=g) * scale)
    return module


def test_model_vit_block_equals_a_hand_computation():
    """A ViT block, in float64, equals softmax(q k^T / sqrt(d)) v per head written out, with timm's
    [q | k | v] x heads channel layout, exact GELU, LayerNorm eps 1e-6 and the pre-norm residual
    order: a head split or merge in another order, a post-norm block or the tanh GELU fail it. The
    tokens include some of tiny variance, where the LayerNorm's eps counts."""
    block = _randomise(taskexpert.Block(12, 3, drop_path=0.0), seed=1).double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 12, generator=g, dtype=torch.float64) * 2
    x[1, :3] = 1 + 2e-3 * torch.randn(3, 12, generator=g, dtype=torch.float64)  # variance ~4e-6
    with torch.no_grad():
        got = block(x).numpy()
    want = _ref_block(x.numpy(), _ref_params(block), heads=3)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    # the final LayerNorm of the backbone has the same eps
    norm, x = _randomise(_tiny(TASKS['nyud']).backbone.norm, seed=7).double(), x.repeat(1, 1, 16)  # (2, 5, 192)
    with torch.no_grad():
        got = norm(x).numpy()
    want = _ref_layer_norm(x.numpy(), _ref_params(norm)['weight'], _ref_params(norm)['bias'], 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('first,gate,memory_write', [(True, 'token', 'replace'), (False, 'token', 'replace'),
                                                     (False, 'image', 'replace'), (False, 'token', 'add')])
def test_model_mmoe_equals_a_hand_computation(first, gate, memory_write):
    """An MMoE, in float64, as its docstring writes it: per-expert LayerNorm (own affine, eps 1e-6) and
    exact GELU, the gate on [X_l ; mean_N X_l] in that order, softmax over E (+1 for the memory),
    gate='image' one mixture per image from the mean of the token logits, memory_write='add' adding
    M_t to F_t. The new memory and the gate weights both."""
    moe = taskexpert.MMoE(['depth', 'semseg'], 12, num_experts=3, expert_dim=5, first=first, gate=gate,
                          memory_write=memory_write)
    moe = _randomise(moe, seed=3).double().eval()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, 12, generator=g, dtype=torch.float64)
    x[0, :2] *= 1e-3  # tokens whose expert features have a tiny variance: the eps counts
    with torch.no_grad():
        moe.experts.bias[:] *= 1e-3
    memory = None if first else {t: torch.randn(2, 7, 5, generator=g, dtype=torch.float64) for t in moe.tasks}
    with torch.no_grad():
        new, gates = moe(x, memory)
    want, want_gates = _ref_mmoe(x.numpy(), _ref_params(moe), memory and {t: m.numpy() for t, m in memory.items()},
                                 3, 5, gate, memory_write)
    for t in moe.tasks:
        assert gates[t].shape == (2, 7, 3 if first else 4)
        # (the gates' softmax runs in float32 whatever the input's precision)
        np.testing.assert_allclose(gates[t].numpy(), want_gates[t], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(new[t].numpy(), want[t], rtol=1e-6, atol=1e-6)
    if gate == 'image':  # one mixture per image: every token of an image weighs the experts alike
        assert torch.equal(gates['depth'], gates['depth'][:, :1].expand_as(gates['depth']))


@pytest.mark.parametrize('gate,memory_write', [('token', 'replace'), ('image', 'add')])
def test_model_taskexpert_forward_equals_a_hand_computation(gate, memory_write):
    """The whole eval-mode forward pass against a numpy transcription: patches row by row, the class
    token first, the position embedding added, blocks 1..12, the taps 3/6/9/12 (the last through the
    final LayerNorm, eps 1e-6) into the MMoEs in order with the memory passed on, each head on the
    last memory (tokens row by row, bilinear x4, 3x3 conv, BatchNorm, GELU, 1x1 conv, bilinear to the
    input size). The weights, BatchNorm statistics included, are random."""
    model = _randomise(_tiny({'depth': 1, 'semseg': 3}, num_experts=3, gate=gate, memory_write=memory_write),
                       seed=5, scale=0.1).eval()
    image = torch.randn(2, 3, *_MODEL_SIZE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out, gates = model.forward_with_gates(image)
    want, want_gates = _ref_taskexpert(model, image)
    for t in ('depth', 'semseg'):
        np.testing.assert_allclose(out[t].numpy(), want[t], rtol=1e-4, atol=1e-4 * np.abs(want[t]).max())
        for tap in range(4):
            np.testing.assert_allclose(gates[tap][t].numpy(), want_gates[tap][t], rtol=1e-4, atol=1e-5)


def test_model_drop_path_grows_linearly_over_the_blocks():
    """Stochastic depth p * l / (depth - 1) for block l = 0..depth-1 (timm / DeiT): the first block is
    never dropped (the same output in training as in eval), the last with the rate given."""
    blocks = _tiny(TASKS['nyud'], drop_path=0.33).backbone.blocks
    assert [b.drop_path for b in blocks] == pytest.approx([0.33 * l / 11 for l in range(12)], abs=1e-12)
    assert blocks[0].drop_path == 0.0 and blocks[11].drop_path == pytest.approx(0.33)
    torch.manual_seed(0)
    x = torch.randn(64, 5, 192)
    with torch.no_grad():
        assert torch.equal(blocks[0].train()(x), blocks[0].eval()(x))  # p = 0: deterministic in training
        both_dropped = (blocks[11].train()(x) == x).all(-1).all(-1)  # (64,): samples that kept only x
    assert 0 < both_dropped.sum() < 64  # p^2 = 0.11 of them


def _ref_bicubic_matrix(n_in, n_out):
    """Rows: the weights of bicubic resizing as PIL's (and timm's antialiased resampling): Keys' cubic
    with a = -0.5 at half-pixel centres, its support widened by n_in / n_out when shrinking, the taps
    outside the grid left out and the rest renormalised."""
    def cubic(t, a=-0.5):
        t = abs(t)
        if t < 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        return a * (t ** 3 - 5 * t ** 2 + 8 * t - 4) if t < 2 else 0.0
    scale = n_in / n_out
    M = np.array([[cubic((j + 0.5 - (i + 0.5) * scale) / max(scale, 1.0)) for j in range(n_in)] for i in range(n_out)])
    return M / M.sum(1, keepdims=True)


def _ref_resample_pos_embed(pos_embed, old_grid, grid):
    """(1, 1 + h0*w0, C) -> (1, 1 + h*w, C): the class token as is, the grid (row by row) bicubic."""
    pos = pos_embed.double().numpy()[0]
    patches = pos[1:].reshape(*old_grid, -1)  # (h0, w0, C)
    out = np.einsum('Hh,hwc,Ww->HWc', _ref_bicubic_matrix(old_grid[0], grid[0]), patches,
                    _ref_bicubic_matrix(old_grid[1], grid[1]))
    return np.concatenate([pos[:1], out.reshape(grid[0] * grid[1], -1)])[None]


@pytest.mark.parametrize('old_grid,grid,given', [
    ((24, 24), (16, 36), False),  # a 384 checkpoint at 256x576: as many patches (576), still resampled
    ((24, 24), (4, 6), False),  # shrunk to a non-square grid
    ((4, 6), (5, 3), True),  # a non-square grid to another (an input size other than the training size)
    ((3, 5), (7, 9), True),  # enlarged
])
def test_model_pos_embed_resampled_as_a_direct_bicubic_of_its_grid(old_grid, grid, given):
    pos = torch.randn(1, 1 + old_grid[0] * old_grid[1], 8, generator=torch.Generator().manual_seed(8))
    got = resample_pos_embed(pos, grid, old_grid if given else None)
    assert got.shape == (1, 1 + grid[0] * grid[1], 8)
    assert torch.equal(got[:, 0], pos[:, 0])  # the class token's slot kept as it is
    np.testing.assert_allclose(got.numpy(), _ref_resample_pos_embed(pos, old_grid, grid), rtol=0, atol=1e-5)
    # and PIL's own bicubic resize of one channel agrees
    channel = Image.fromarray(pos[0, 1:, 3].reshape(old_grid).numpy(), 'F').resize(grid[::-1], Image.BICUBIC)
    np.testing.assert_allclose(got[0, 1:, 3].reshape(grid).numpy(), np.asarray(channel), rtol=0, atol=1e-5)


def test_model_pos_embed_of_a_square_checkpoint_at_256x576_is_resampled_and_a_fine_tuned_one_kept(tmp_path):
    """A 24x24 ImageNet checkpoint loaded at 256x576 (16x36 = 576 patches, as many as 24x24) must be
    resampled, not used as is with its positions scrambled; a fine-tuned non-square embedding saved at
    the model's own grid loads unchanged."""
    model = TaskExpert({'depth': 1}, backbone='tiny', img_size=(256, 576), expert_dim=8)
    sd = _timm_layout_checkpoint(model)
    torch.save(sd, tmp_path / 'vit.pth')
    load_pretrained(model, str(tmp_path / 'vit.pth'))
    np.testing.assert_allclose(model.backbone.pos_embed.detach().numpy(),
                               _ref_resample_pos_embed(sd['pos_embed'], (24, 24), (16, 36)), rtol=0, atol=1e-5)
    model = _tiny({'depth': 1})  # 4x6 tokens: 24, not a square
    sd = _timm_layout_checkpoint(model, grid=(4, 6))
    torch.save(sd, tmp_path / 'fine_tuned.pth')
    load_pretrained(model, str(tmp_path / 'fine_tuned.pth'))
    assert torch.equal(model.backbone.pos_embed, sd['pos_embed'])
    with pytest.raises(ValueError, match='position embedding with 20 patches: neither a square grid nor 4x6'):
        resample_pos_embed(torch.zeros(1, 21, 8), (4, 6))


def test_model_pretrained_keys_missing_or_unexpected_each_named_in_one_line(tmp_path):
    """load_pretrained: a key the model lacks and a key the checkpoint lacks are each named in a
    one-line error (not a shape error, not a load_state_dict traceback); the classifier (head.*, fc_norm.*)
    is dropped; the 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes go, in either order."""
    model = _tiny({'depth': 1})
    sd = _timm_layout_checkpoint(model)
    sd['fc_norm.weight'], sd['fc_norm.bias'] = torch.ones(192), torch.zeros(192)
    for name, change in (('unexpected', lambda d: d.update({'blocks.12.norm1.weight': torch.ones(192)})),
                         ('missing', lambda d: d.pop('blocks.7.norm2.bias'))):
        broken = dict(sd)
        change(broken)
        torch.save(broken, tmp_path / f'{name}.pth')
        with pytest.raises(KeyError) as e:
            load_pretrained(model, str(tmp_path / f'{name}.pth'))
        msg = e.value.args[0]
        key = 'blocks.12.norm1.weight' if name == 'unexpected' else 'blocks.7.norm2.bias'
        assert re.search(f"{name} \\['{re.escape(key)}'\\]", msg) and str(tmp_path) in msg and '\n' not in msg, msg
    sd = {k: v * 0 + i for i, (k, v) in enumerate(sd.items())}  # every tensor its own value
    for prefix in ('module.', '_orig_mod.', 'module._orig_mod.', '_orig_mod.module.'):
        torch.save({'state_dict': {prefix + k: v for k, v in sd.items()}}, tmp_path / 'prefixed.pth')
        fresh = _tiny({'depth': 1})
        load_pretrained(fresh, str(tmp_path / 'prefixed.pth'))
        for k, v in fresh.backbone.state_dict().items():
            assert torch.equal(v, sd[k] if k != 'pos_embed' else resample_pos_embed(sd[k], (4, 6))), (prefix, k)


# ==================================================================================================
# Losses (taskexpert.py) and metrics (data.py: meters, boundaries, Delta_m)
# ==================================================================================================

def _metrics_batch(tasks, B=2, H=8, W=10, seed=0):
    """Random outputs and targets in the contract's formats, with some void pixels."""
    g = torch.Generator().manual_seed(seed)
    out = {t: torch.randn(B, c, H, W, generator=g, requires_grad=True) for t, c in tasks.items()}
    batch = {}
    for t, c in tasks.items():
        if t in ('semseg', 'human_parts'):
            y = torch.randint(0, c, (B, H, W), generator=g)
            y[:, 0] = 255
        elif t in ('sal', 'edge'):
            y = (torch.rand(B, 1, H, W, generator=g) > 0.7).float()
            y[..., 0] = 255
        elif t == 'normals':
            y = torch.nn.functional.normalize(torch.randn(B, 3, H, W, generator=g), dim=1)
            y[..., 0] = 0
        else:  # depth
            y = torch.rand(B, 1, H, W, generator=g) * 5
            y[..., 0] = 0
        batch[t] = y
    return out, batch


# ---- losses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('tasks', [TASKS['nyud'], TASKS['pascal']])
def test_metrics_losses_finite_with_gradients(tasks):
    out, batch = _metrics_batch(tasks)
    total, per_task = MultiTaskLoss(tasks)(out, batch)
    assert set(per_task) == set(tasks)
    assert torch.isfinite(total) and all(torch.isfinite(v) and v > 0 for v in per_task.values())
    total.backward()
    assert all(torch.isfinite(o.grad).all() and o.grad.abs().sum() > 0 for o in out.values())


def test_metrics_losses_all_ignore_is_zero_not_nan():
    out, batch = _metrics_batch(TASKS['pascal'])
    batch = {t: torch.full_like(y, 255.0) if t in ('sal', 'edge') else torch.full_like(y, 255) for t, y in batch.items()}
    batch['normals'] = torch.zeros_like(batch['normals'])
    total, per_task = MultiTaskLoss(TASKS['pascal'])(out, batch)
    assert all(v.item() == 0 for v in per_task.values())
    total.backward()  # the graph is kept: zero gradients, not NaN
    assert all(torch.equal(o.grad, torch.zeros_like(o.grad)) for o in out.values())
    depth = torch.zeros(1, 1, 4, 4)
    assert MultiTaskLoss(['depth'])({'depth': torch.randn(1, 1, 4, 4)}, {'depth': depth})[0].item() == 0


def test_metrics_l1_losses_zero_for_perfect_predictions():
    _, batch = _metrics_batch(TASKS['nyud'])
    out = {'normals': 3.0 * batch['normals'], 'depth': batch['depth'].clone()}  # normals are unit-normalised
    out['depth'][..., 0] = 7.0  # invalid (0) depth pixels do not count
    _, per_task = MultiTaskLoss(['normals', 'depth'])(out, batch)
    assert per_task['normals'].item() < 1e-6 and per_task['depth'].item() == 0


def test_metrics_losses_hand_values():
    # CE: two equal logits -> ln 2 per valid pixel; the void pixel is left out
    logits = torch.zeros(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    loss = MultiTaskLoss(['semseg'])({'semseg': logits}, {'semseg': target})[1]['semseg']
    assert loss.item() == pytest.approx(math.log(2))
    # balanced BCE at logit 0 (each term ln 2), target [1, 0, 0, void]: saliency weighs positives by
    # the fraction of negatives (2/3), edge by 0.95; mean over the 3 valid pixels
    y = torch.tensor([1.0, 0.0, 0.0, 255.0]).reshape(1, 1, 1, 4)
    x = torch.zeros(1, 1, 1, 4)
    _, per_task = MultiTaskLoss(['sal', 'edge'])({'sal': x, 'edge': x}, {'sal': y, 'edge': y})
    assert per_task['sal'].item() == pytest.approx(math.log(2) * (2 / 3 + 2 * (1 / 3)) / 3)
    assert per_task['edge'].item() == pytest.approx(math.log(2) * (0.95 + 2 * 0.05) / 3)
    no_salient = torch.tensor([0.0, 0.0, 255.0]).reshape(1, 1, 1, 3)  # w = 1: negatives weigh 0
    assert MultiTaskLoss(['sal'])({'sal': torch.randn(1, 1, 1, 3)}, {'sal': no_salient})[0].item() == 0
    # normals: |unit(pred) - gt| summed over the 3 components, averaged over valid pixels
    gt = torch.tensor([0.0, 0.0, 1.0]).reshape(1, 3, 1, 1).expand(1, 3, 1, 2).clone()
    gt[..., 1] = 0  # invalid pixel
    pred = torch.tensor([1.0, 0.0, 0.0]).reshape(1, 3, 1, 1).expand(1, 3, 1, 2)
    assert MultiTaskLoss(['normals'])({'normals': pred}, {'normals': gt})[0].item() == pytest.approx(10 * 2.0)
    # depth: L1 in metres over the valid pixels alone (0 = missing, 255 = the reference's padding)
    gt = torch.tensor([2.0, 0.0, 255.0, 4.0]).reshape(1, 1, 1, 4)
    pred = torch.tensor([3.0, 7.0, 9.0, 3.5]).reshape(1, 1, 1, 4)
    assert MultiTaskLoss(['depth'])({'depth': pred}, {'depth': gt})[1]['depth'].item() == pytest.approx((1 + 0.5) / 2)


def test_metrics_a_task_of_a_new_kind_stops_at_every_switch_it_lacks(tmp_path, monkeypatch):
    """A task added with a kind the code has no case for is an error naming it at each switch on the
    kind, never another kind's case by default (README, 'Adding a task'); a task judged by a meter that
    does not exist, a NYUD task without its reader, likewise."""
    monkeypatch.setitem(TASK_TABLE, 'flow', taskexpert.Task('flow', 1.0, 'epe', False, 'flow', 'optical flow'))
    x = torch.zeros(1, 2, 4, 6)
    calls = {'loss': lambda: MultiTaskLoss(['flow']).task_loss('flow', x, x),
             'post-processing': lambda: postprocess({'flow': x}),
             'padding': lambda: data.to_tensors({'image': np.zeros((4, 6, 3), np.uint8), 'flow': np.zeros((4, 6, 2))}, (4, 6)),
             'picture': lambda: train.render('flow', x[0]),
             'random target': lambda: train.random_batch({'flow': 2}, 1, (4, 6), torch.device('cpu')),
             'metric of its exported output': lambda: export.as_scores('flow', x.numpy(), 2),
             'tolerance of its exported output': lambda: export.compare({'flow': x.numpy()}, {'flow': x.numpy()},
                                                                        {'flow': x.numpy()}, export.TOLERANCE['fp32'])}
    for what, call in calls.items():
        with pytest.raises(ValueError, match=f"task 'flow' of kind 'flow': no {what} for this kind"):
            call()
    with pytest.raises(ValueError, match="task 'flow': no meter 'flow'"):
        make_meters(['flow'], 'nyud')
    root = _data_write_nyud_tree(tmp_path)
    monkeypatch.setitem(TASKS['nyud'], 'flow', 2)  # a task of the dataset, but no row of the reader's FILES
    with pytest.raises(ValueError, match="NYUD has no reader for task 'flow'"):
        data.NYUD(root, 'val', train=False, tasks=('flow',))


def test_metrics_loss_weights_defaults_and_overrides():
    out, batch = _metrics_batch(TASKS['pascal'])
    total, per_task = MultiTaskLoss(TASKS['pascal'])(out, batch)
    expected = {'semseg': 1, 'human_parts': 2, 'sal': 5, 'normals': 10, 'edge': 50}
    assert total.item() == pytest.approx(sum(expected[t] * per_task[t].item() for t in TASKS['pascal']))
    total, per_task = MultiTaskLoss(['semseg', 'edge'], weights={'edge': 1.0})(out, batch)
    assert total.item() == pytest.approx(per_task['semseg'].item() + per_task['edge'].item())
    y = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    x = torch.zeros(1, 1, 1, 2)
    edge = MultiTaskLoss(['edge'], pos_weights={'edge': 0.5})({'edge': x}, {'edge': y})[1]['edge']
    assert edge.item() == pytest.approx(0.5 * math.log(2))
    with pytest.raises(ValueError, match='unknown task'):
        MultiTaskLoss(['semseg', 'optical_flow'])


def test_metrics_losses_fp32_under_autocast():
    out, batch = _metrics_batch(TASKS['nyud'])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        total, per_task = MultiTaskLoss(TASKS['nyud'])({t: o.bfloat16() for t, o in out.items()}, batch)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in per_task.values())


# ---- losses against hand values: the balanced BCE's weights, the normals' sum over components ------

def _bce_by_hand(logits, targets, w):
    """sum over valid pixels of w y (-log s(x)) + (1 - w)(1 - y)(-log(1 - s(x))), over their count."""
    terms = [w * -math.log(1 / (1 + math.exp(-x))) if y == 1 else (1 - w) * -math.log(1 - 1 / (1 + math.exp(-x)))
             for x, y in zip(logits, targets) if y != 255]
    return sum(terms) / len(terms)


def test_metrics_loss_balanced_bce_weighs_by_the_batchs_share_of_negatives_or_a_fixed_weight():
    """pos_weight None (saliency): w = the share of negatives among the valid pixels of the whole batch,
    not of each image, the void pixels neither; a fixed pos_weight (edge 0.95, or one given) whatever the
    batch holds. Random logits: which term weighs the positives counts too."""
    target = torch.tensor([[1.0, 0.0, 255.0, 255.0], [1.0, 1.0, 1.0, 0.0]]).reshape(2, 1, 1, 4)
    logit = torch.tensor([[0.7, -1.3, 2.0, -0.4], [1.1, -0.2, 0.3, 0.9]]).reshape(2, 1, 1, 4)
    flat = list(zip(logit.flatten().tolist(), target.flatten().tolist()))
    x, y = [v[0] for v in flat], [v[1] for v in flat]
    _, per_task = MultiTaskLoss(['sal', 'edge'])({'sal': logit, 'edge': logit}, {'sal': target, 'edge': target})
    assert per_task['sal'].item() == pytest.approx(_bce_by_hand(x, y, 2 / 6), rel=1e-6)  # 2 negatives of 6 valid
    assert per_task['edge'].item() == pytest.approx(_bce_by_hand(x, y, 0.95), rel=1e-6)
    given = MultiTaskLoss(['sal'], pos_weights={'sal': 0.3})({'sal': logit}, {'sal': target})[0]
    assert given.item() == pytest.approx(5.0 * _bce_by_hand(x, y, 0.3), rel=1e-6)


def test_metrics_loss_normals_sums_the_components_over_valid_pixels():
    """|unit(pred) - gt| summed over x, y, z, then over the valid pixels (any component non-zero, a
    zero component of a valid normal included) and divided by their count; the prediction's length
    does not count."""
    gt = np.array([[0.6, 0.0, 0.8], [0.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # the middle pixel: no normal
    pred = np.array([[2.0, 1.0, -2.0], [5.0, 5.0, 5.0], [0.3, -0.1, 0.0]])
    unit = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    want = (np.abs(unit[0] - gt[0]).sum() + np.abs(unit[2] - gt[2]).sum()) / 2
    as_maps = lambda a: torch.tensor(a, dtype=torch.float32).T.reshape(1, 3, 1, 3)  # noqa: E731
    loss = MultiTaskLoss(['normals'])({'normals': as_maps(pred)}, {'normals': as_maps(gt)})[1]['normals']
    assert loss.item() == pytest.approx(want, rel=1e-6)


# ---- dense metrics --------------------------------------------------------------------------------

def _metrics_onehot(labels, C):
    """Labels (B, H, W) -> logits (B, C, H, W) whose argmax is the label."""
    return torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).float()


def test_metrics_seg_known_confusion():
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    pred = _metrics_onehot(torch.tensor([[[0, 1, 1, 1, 0]]]), 2)
    m = SegMeter(('wall', 'floor'))
    m.update(pred, target)
    s = m.score()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; the void pixel never counts
    assert s['class_IoU'] == pytest.approx({'wall': 50.0, 'floor': 100 * 2 / 3})
    assert s['mIoU'] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert s['pixAcc'] == pytest.approx(75.0)
    # perfect prediction: 100; a class absent from GT and prediction scores 0 (reference behaviour)
    m = SegMeter(('a', 'b', 'c'))
    m.update(_metrics_onehot(torch.tensor([[[0, 1, 1]]]), 3), torch.tensor([[[0, 1, 1]]]))
    assert m.score()['mIoU'] == pytest.approx(100 * 2 / 3) and m.score()['pixAcc'] == 100
    assert m.score()['class_IoU'] == {'a': 100.0, 'b': 100.0, 'c': 0.0}
    with pytest.raises(ValueError, match='target labels'):
        m.update(_metrics_onehot(torch.tensor([[[0]]]), 3), torch.tensor([[[5]]]))


def test_metrics_depth_hand_values():
    pred = torch.tensor([1.0, 2.0, 4.0, -1.0, 9.0]).reshape(1, 1, 1, 5)
    target = torch.tensor([1.0, 1.0, 2.0, 1.0, 0.0]).reshape(1, 1, 1, 5)  # last pixel invalid
    m = DepthMeter()
    m.update(pred, target)
    s = m.score()
    # errors 0, 1, 2, ~1 (the negative prediction is clamped to 1e-9, as the reference)
    assert s['rmse'] == pytest.approx(math.sqrt((0 + 1 + 4 + 1) / 4))
    assert s['abs_rel'] == pytest.approx((0 + 1 + 1 + 1) / 4)
    assert s['log_rmse'] == pytest.approx(math.sqrt((2 * math.log(2) ** 2 + math.log(1e-9) ** 2) / 4))


def test_metrics_normals_hand_values():
    gt = torch.tensor([[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.float32).T.reshape(1, 3, 1, 4)
    pred = torch.tensor([[0, 0, 2], [1, 0, 1], [0, 1, 0], [0, 0, 1]], dtype=torch.float32).T.reshape(1, 3, 1, 4)
    m = NormalsMeter()
    m.update(pred, gt)  # errors 0, 45, 90 deg; the all-zero GT pixel is invalid
    s = m.score()
    assert s['mean'] == pytest.approx(45.0, abs=1e-4)
    assert s['median'] == pytest.approx(45.0, abs=0.01)
    assert s['rmse'] == pytest.approx(math.sqrt((45 ** 2 + 90 ** 2) / 3), abs=1e-3)
    assert s['11.25'] == s['22.5'] == s['30'] == pytest.approx(100 / 3)
    m.update(pred[..., :2], gt[..., :2])  # 5 errors 0, 45, 90, 0, 45: median 45; even count averages
    m.update(pred[..., 2:3], gt[..., 2:3])  # 6 errors: median (45 + 45) / 2
    assert m.score()['median'] == pytest.approx(45.0, abs=0.01)


def test_metrics_normals_float32_equal_float64_arccos():
    # the meter computes in float32 for speed; the reference's float64 arccos of the unit vectors' dot
    # product must give the same scores, with errors near 0 and 180 deg and zero (invalid) GT pixels
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(2, 3, 40, 50, generator=g)
    pred = torch.randn(2, 3, 40, 50, generator=g) * 3
    pred[:, :, :5] = gt[:, :, :5] * 2 + 1e-4 * torch.randn(2, 3, 5, 50, generator=g)  # ~0 deg
    pred[:, :, 5:10] = -gt[:, :, 5:10]  # 180 deg
    gt[:, :, -3:] = 0  # invalid
    m = NormalsMeter()
    m.update(pred, gt)
    s = m.score()
    p, q = (torch.nn.functional.normalize(x.double(), dim=1).numpy() for x in (pred, gt))
    err = np.degrees(np.arccos(np.clip((p * q).sum(1), -1, 1)))[:, :-3]  # the valid rows
    assert s['mean'] == pytest.approx(err.mean(), abs=1e-4)
    assert s['rmse'] == pytest.approx(np.sqrt((err ** 2).mean()), abs=1e-4)
    assert s['median'] == pytest.approx(np.median(err), abs=0.01)
    for t in NormalsMeter.THRESHOLDS:
        assert s[f'{t:g}'] == pytest.approx(100 * (err < t).mean(), abs=1e-9)


def test_metrics_saliency_maxf_countable():
    # GT [1, 1, 0, 0] (+ a void pixel); probabilities 0.9, 0.3, 0.5, 0.1. The reference's double sigmoid
    # leaves these cases: all positive (P 1/2, R 1), {0.9, 0.3, 0.5} (P 2/3, R 1), {0.9, 0.5} (1/2, 1/2),
    # {0.9} (P 1, R 1/2), none (F 0). F = 1.3 P R / (0.3 P + R); best {0.9}: 1.3 * 0.5 / 0.8 = 0.8125.
    prob = torch.tensor([0.9, 0.3, 0.5, 0.1, 0.99])
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 255.0]).reshape(1, 1, 1, 5)
    m = SaliencyMeter()
    m.update(torch.logit(prob).reshape(1, 1, 1, 5), target)
    assert m.score()['maxF'] == pytest.approx(81.25, abs=1e-4)
    perfect = SaliencyMeter()
    perfect.update(torch.tensor([10.0, 10.0, -10.0, -10.0]).reshape(1, 1, 1, 4), target[..., :4])
    assert perfect.score()['maxF'] == pytest.approx(100.0)
    # probabilities 0.97 (salient) and 0.9 (not): apart at 0.95 with one sigmoid; the reference's second
    # sigmoid brings both to 0.71-0.73, so at best P 1/2, R 1: F = 1.3 * 0.5 / 1.15
    near = SaliencyMeter()
    near.update(torch.logit(torch.tensor([0.97, 0.9])).reshape(1, 1, 1, 2), torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2))
    assert near.score()['maxF'] == pytest.approx(100 * 0.65 / 1.15)


@pytest.mark.parametrize('task', ['semseg', 'depth', 'normals', 'sal', 'edge'])
def test_metrics_two_batches_equal_one_batch(task):
    out, batch = _metrics_batch({task: TASKS['nyud'].get(task, 1)}, B=2, H=24, W=28, seed=3)
    pred, target = out[task].detach(), batch[task]
    whole, halves = make_meters({task: TASKS['nyud'].get(task, 1)}, 'nyud')[task], make_meters({task: TASKS['nyud'].get(task, 1)}, 'nyud')[task]
    whole.update(pred, target)
    halves.update(pred[:1], target[:1])
    halves.update(pred[1:], target[1:])
    assert whole.score() == _metrics_approx(halves.score())


def test_metrics_update_meters_scores_each_image_on_its_content_and_skips_what_it_leaves_unscored():
    """update_meters feeds each image of a padded batch cut to its content (meta 'size'), and leaves out
    the tasks its meta lists as unscored (PASCAL: human parts without a person, edges outside test_new):
    the meters hold what feeding the kept crops alone gives."""
    tasks = {'human_parts': 7, 'edge': 1}
    out, batch = _metrics_batch(tasks, B=2, H=24, W=28, seed=5)
    out = {t: o.detach() for t, o in out.items()}
    batch['meta'] = [{'size': (20, 28), 'unscored': ('edge',)}, {'size': (24, 16), 'unscored': ('human_parts',)}]
    meters, alone = make_meters(tasks, 'pascal'), make_meters(tasks, 'pascal')
    data.update_meters(meters, out, batch)
    alone['human_parts'].update(out['human_parts'][:1, :, :20], batch['human_parts'][:1, :20])
    alone['edge'].update(out['edge'][1:, :, :, :16], batch['edge'][1:, :, :, :16])
    for t in tasks:
        for a, b in zip(meters[t].state(), alone[t].state()):
            assert torch.equal(a, b), t


def _metrics_approx(scores, **tolerance):
    """A meter's scores for ==, its floats and the floats of its per-class IoU approximately."""
    return {k: pytest.approx(v, **tolerance) for k, v in scores.items()}


def test_metrics_meter_states_of_shards_add_up():
    # what sharded evaluation relies on: the all-reduced (summed) states of two halves of a split
    # score like one meter that saw all of it
    tasks = {**TASKS['pascal'], 'depth': 1}
    out, batch = _metrics_batch(tasks, B=4, H=20, W=24, seed=5)
    whole, halves = make_meters(tasks, 'pascal'), [make_meters(tasks, 'pascal') for _ in range(2)]
    for t in tasks:
        whole[t].update(out[t], batch[t])
        for k, part in enumerate(halves):
            part[t].update(out[t][2 * k:2 * k + 2], batch[t][2 * k:2 * k + 2])
        for a, b in zip(halves[0][t].state(), halves[1][t].state()):
            a += b
        assert halves[0][t].score() == _metrics_approx(whole[t].score(), rel=1e-12), t


# ---- boundaries -----------------------------------------------------------------------------------

def _metrics_outline(H=48, W=64, top=10, left=12, shift=0):
    """1-px rectangle outline, shifted right by `shift` px."""
    m = np.zeros((H, W), bool)
    m[top, left:W - left] = m[H - top, left:W - left] = True
    m[top:H - top + 1, left] = m[top:H - top + 1, W - left - 1] = True
    return np.roll(m, shift, axis=1)


def _metrics_edge_score(pred_mask, target, max_dist=0.03):
    meter = EdgeMeter(max_dist)
    logits = torch.from_numpy(np.where(pred_mask, 8.0, -8.0)).float()[None, None]
    meter.update(logits, torch.from_numpy(target).float()[None, None])
    return meter.score()


def test_metrics_edge_thresholds_and_thinning():
    assert len(EDGE_THRESHOLDS) == 101 and EDGE_THRESHOLDS[0] == 0.001 and EDGE_THRESHOLDS[-1] == 0.999
    assert np.allclose(EDGE_THRESHOLDS[1:-1], np.arange(1, 100) / 100)
    bar = np.zeros((9, 20), bool)
    bar[3:6, 2:18] = True  # 3 px thick -> 1 px line along its middle
    line = thin(bar)
    assert line[4, 4:16].all() and line.sum(axis=0).max() == 1 and not line[[3, 5], 5:15].any()
    assert np.array_equal(thin(np.eye(12, dtype=bool)), np.eye(12, dtype=bool))  # already thin
    outline = _metrics_outline()  # a 4-connected outline loses its 4 corner pixels (8-connected)
    assert (outline & ~thin(outline)).sum() == 4 and not (thin(outline) & ~outline).any()


def _seism_seg2bmap(seg):
    """SEISM's misc/seg2bmap.m for a bmap of the image's own size, pixel by pixel as the .m file reads
    (its shifted copies e, s, se are 0 beyond the image, and the last row, column and corner are
    overwritten): the independent reference that data.seg2bmap is checked against."""
    h, w = seg.shape
    b = np.zeros((h, w), bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue  # b(end, end) = 0
            if y == h - 1:  # b(end, :) = seg(end, :) ~= e(end, :)
                b[y, x] = seg[y, x] != seg[y, x + 1]
            elif x == w - 1:  # b(:, end) = seg(:, end) ~= s(:, end)
                b[y, x] = seg[y, x] != seg[y + 1, x]
            else:  # seg ~= e | seg ~= s | seg ~= se
                b[y, x] = seg[y, x] != seg[y, x + 1] or seg[y, x] != seg[y + 1, x] or seg[y, x] != seg[y + 1, x + 1]
    return b


def _marked(b):
    return [''.join('x' if v else '.' for v in row) for row in b]


def test_metrics_seg2bmap_marks_each_border_once_on_its_top_left_side():
    split = np.zeros((4, 6), np.uint8)
    split[:, 3:] = 7  # two regions: the column left of the border, last row included
    assert _marked(data.seg2bmap(split)) == ['..x...'] * 4
    line = np.zeros((5, 7), np.uint8)
    line[:, 3] = 255  # a 1-px line of another label: both of its borders, 2 px
    assert _marked(data.seg2bmap(line)) == ['..xx...'] * 5
    # SEISM's GT boundary thins them to one line, a pixel left of the stored one (its top end eaten)
    assert _marked(data.gt_boundary(line)) == ['.......'] + ['..x....'] * 4
    ramp = np.array([[10, 10, 11, 12, 12]] * 3)  # three labels in a row: both borders (the
    assert _marked(data.seg2bmap(ramp)) == ['.xx..'] * 3  # Laplacian is 0 at the middle one)
    junction = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert _marked(data.seg2bmap(junction)) == ['....', 'xxxx', '.x..', '.x..']
    # last row: east only; last column: south only; the bottom-right pixel never
    for y, x, want in ((2, 2, ['...', '.xx', '.x.']), (2, 1, ['...', 'xx.', 'xx.']), (1, 2, ['.xx', '.xx', '...'])):
        dot = np.zeros((3, 3), np.int32)
        dot[y, x] = 5
        assert _marked(data.seg2bmap(dot)) == want, (y, x)
    rng = np.random.default_rng(0)
    for shape in ((1, 9), (9, 1), (1, 1), (13, 17)):
        seg = rng.integers(0, 3, shape).astype(np.uint16)
        assert np.array_equal(data.seg2bmap(seg), _seism_seg2bmap(seg)), shape


def test_metrics_edge_perfect_shifted_and_ignored():
    gt = thin(_metrics_outline())  # 1-px outline, as the readers give SEISM's; radius 0.03 x 80 = 2.4 px
    target = gt.astype(np.float32)
    assert _metrics_edge_score(gt, target)['odsF'] == pytest.approx(100.0)
    # the target is the GT boundary as given, not thinned again: an outline's 4 corners stay unmatched
    corners = _metrics_outline().astype(np.float32)  # 134 GT pixels, 130 predicted, all matched
    assert _metrics_edge_score(gt, corners)['odsF'] == pytest.approx(100 * 2 * 130 / (130 + 134))
    assert _metrics_edge_score(_metrics_outline(shift=1), target)['odsF'] == pytest.approx(100.0)
    far = _metrics_edge_score(_metrics_outline(shift=6), target)  # only the horizontal sides still match
    assert far['odsF'] < 80 and far['oisF'] == pytest.approx(far['odsF'])
    # a spurious prediction under void (255) pixels counts neither as prediction nor as GT
    spurious = gt.copy()
    spurious[20:30, 30] = True
    target[18:32, 28:33] = 255
    assert _metrics_edge_score(spurious, target)['odsF'] == pytest.approx(100.0)
    assert _metrics_edge_score(spurious, gt.astype(np.float32))['odsF'] < 100.0


def test_metrics_edge_radius_and_strict_thresholds():
    """A boundary is matched within max_dist x the diagonal (here 2.4 px), not beyond; a map exactly at a
    threshold is not above it (SEISM binarises > t)."""
    gt = np.zeros((48, 64), bool)
    gt[10:38, 20] = True  # a vertical line: its pixels are 2 or 3 px from the predicted ones below
    for shift, odsF in ((2, 100.0), (3, 0.0)):  # 2 <= 2.4 < 3 < 2 x 2.4
        assert _metrics_edge_score(np.roll(gt, shift, axis=1), gt.astype(np.float32))['odsF'] == pytest.approx(odsF)
    meter = EdgeMeter(0.03)
    level = torch.logit(torch.tensor(51.5 / 255))  # 255 sigmoid -> 51.5, truncated to 51: 51 / 255 = 0.2 exactly
    meter.update(torch.where(torch.from_numpy(gt), level, -8.0)[None, None], torch.from_numpy(gt).float()[None, None])
    k = list(EDGE_THRESHOLDS).index(0.2)
    assert meter.counts[k, 1] == 0 and meter.counts[k - 1, 1] > 0  # predicted pixels at t = 0.2, at t = 0.19


@pytest.mark.parametrize('normal', [0, 45, 135])
def test_metrics_edge_nms_keeps_a_soft_ridge_only_at_its_maximum_along_its_normal(normal):
    """A blurred straight line whose normal points at a known angle (x right, y down; on the pixel
    lattice, where Dollar's orientation atan(Oyy sign(-Oxy) / Oxx) is exact): inside the faded border
    the NMS keeps exactly the pixels on the line, at their value, and drops every other one. With the
    x and y gradients swapped, or the normal's y step negated, the 135-degree line comes out 3 px wide.
    (A horizontal line is left out: there Oxy is exactly 0, and SEISM's formula itself reads its normal
    as horizontal.)"""
    ys, xs = np.mgrid[0:40, 0:40]
    a = np.deg2rad(normal)
    d = (xs - 20) * np.cos(a) + (ys - 20) * np.sin(a)  # signed distance to the line along its normal
    E = np.exp(-d ** 2 / (2 * 1.5 ** 2))
    out, inner = _edge_nms(E), (slice(5, -5), slice(5, -5))
    on_line = np.abs(d[inner]) < 1e-9
    assert on_line.sum() >= 28 and np.array_equal(out[inner] > 0, on_line), normal
    assert np.array_equal(out[inner][on_line], E[inner][on_line])


def test_metrics_edge_nms_fades_a_5px_border():
    """edgesNmsMex's border: column (row) k and its mirror k from the far side scaled by k / 5 for k < 5,
    corners by both: a constant map (every pixel its own maximum) comes out as that ramp."""
    E = np.full((14, 17), 0.6)
    ramp = lambda n: np.minimum(np.minimum(np.arange(n), np.arange(n)[::-1]), 5) / 5  # noqa: E731
    np.testing.assert_allclose(_edge_nms(E), 0.6 * np.outer(ramp(14), ramp(17)), rtol=1e-12)


def _metrics_flat_prediction(H=40, W=56, seed=0):
    """Edge probabilities of an untrained model (nearly flat: 6 levels in its 8-bit map), whose NMS
    keeps its plateaus, more than half of the image."""
    rng = np.random.default_rng(seed)
    return 0.48 + 0.02 * rng.random((H, W))


def test_metrics_nested_maps_thinned_at_once_as_one_by_one():
    rng = np.random.default_rng(0)
    # a constant map survives NMS whole: the thresholds' maps are the image less 0-4 fading border rings
    values = [_edge_nms(np.full((40, 56), 125 / 255)), _edge_nms(_metrics_flat_prediction(seed=1))]
    values += [rng.random((19, 23)) ** p for p in (0.3, 1, 3)]
    for v in values:
        level = np.searchsorted(np.sort(rng.choice(EDGE_THRESHOLDS, 40, replace=False)), v, side='right')
        lanes = _thin_lanes(level, 40)  # bit k: lane k = thin(level > k), all 40 together
        for k in range(40):
            assert np.array_equal((lanes >> np.uint64(k)) & np.uint64(1) == 1, thin(level > k)), k


def test_metrics_edge_pool_counts_equal_serial():
    rng = np.random.default_rng(1)
    preds = [torch.logit(torch.from_numpy(_metrics_flat_prediction(seed=s))).float()[None, None] for s in range(3)]
    preds.append(torch.from_numpy(np.where(_metrics_outline(40, 56, shift=1), 6.0, -6.0)).float()[None, None])
    targets = [torch.from_numpy(_metrics_outline(40, 56)).float()[None, None] for _ in preds]
    targets[1][..., 10:20, :] = 255
    targets[2] = torch.from_numpy((rng.random((40, 56)) < 0.05).astype(np.float32))[None, None]
    serial = EdgeMeter(0.011)
    with EdgePool(2) as pool:
        parallel = EdgeMeter(0.011, pool)
        for p, t in zip(preds, targets):
            serial.update(p, t)
            parallel.update(p, t)  # returns before the workers are done
        assert serial.score() == parallel.score() and 0 < serial.score()['odsF'] < 100
    for a, b in zip(serial.state(), parallel.state()):
        assert torch.equal(a, b)


def test_metrics_pascal_boundaries_on_seism_test_new():
    ids = sorted(EDGE_TEST_NEW)
    assert len(ids) == 2498
    # sha256 of the 2,498 ids of SEISM's gt_sets/PASCALContext/test_new.txt, one per line
    assert hashlib.sha256('\n'.join(ids).encode()).hexdigest() == \
        '36b2fca3b8f3562bbcbcc7b3a6e305fa57bfbb97266dee347fd831eb4faf5317'
    assert ids[:3] == ['2008_000003', '2008_000007', '2008_000009'] and ids[-1] == '2010_006061'
    assert '2008_008203' in ids and '2010_002089' in ids and '2008_000002' not in ids


def test_metrics_maximum_matching_is_exact():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n_p, n_g = rng.integers(1, 40, size=2)
        pairs = np.unique(np.stack([rng.integers(0, n_p, 60), rng.integers(0, n_g, 60)], 1), axis=0)
        p, g = pairs[:, 0], pairs[:, 1]  # sorted by p
        mate_p, mate_g = np.full(n_p, -1), np.full(n_g, -1)
        if trial % 2:  # warm start from some valid matching, as across thresholds
            for i in range(0, len(p), 3):
                if mate_p[p[i]] < 0 and mate_g[g[i]] < 0:
                    mate_p[p[i]], mate_g[g[i]] = g[i], p[i]
        size = _maximum_matching(p, g, mate_p, mate_g)
        graph = csr_array((np.ones(len(p)), (p, g)), shape=(n_p, n_g))
        assert size == (maximum_bipartite_matching(graph, perm_type='column') >= 0).sum()
        matched = np.flatnonzero(mate_p >= 0)  # a valid matching along existing pairs
        assert len(matched) == size and np.array_equal(mate_g[mate_p[matched]], matched)
        assert set(zip(matched, mate_p[matched])) <= set(zip(p, g))


# ---- meters, main metrics, Delta_m -----------------------------------------------------------------

def test_metrics_make_meters_and_main_metric_keys():
    meters = make_meters(TASKS['pascal'], 'pascal')
    assert meters['edge'].max_dist == 0.0075 and meters['human_parts'].num_classes == 7
    nyud = make_meters(TASKS['nyud'], 'nyud')
    assert nyud['edge'].max_dist == make_meters(TASKS['nyud'], 'synthetic')['edge'].max_dist == 0.011
    assert nyud['semseg'].num_classes == 40
    out, batch = _metrics_batch(TASKS['pascal'], B=1, H=16, W=16)
    for t, m in meters.items():
        m.update(out[t].detach(), batch[t])
        assert TASK_TABLE[t].metric in m.score()
    with pytest.raises(ValueError, match='unknown dataset'):
        make_meters(TASKS['nyud'], 'cityscapes')
    with pytest.raises(ValueError, match='unknown task'):
        make_meters({'semseg': 40, 'flow': 2}, 'nyud')


@pytest.mark.parametrize('dataset', ['nyud', 'pascal'])
def test_metrics_class_iou_by_name_averages_to_miou(dataset):
    tasks = {t: c for t, c in TASKS[dataset].items() if TASK_TABLE[t].kind == 'classes'}
    out, batch = _metrics_batch(tasks, B=2, H=48, W=64, seed=7)
    for t, meter in make_meters(tasks, dataset).items():
        meter.update(out[t].detach(), batch[t])
        scores = meter.score()
        assert list(scores['class_IoU']) == list(data.CLASS_NAMES[dataset][t]) and len(scores['class_IoU']) == tasks[t]
        assert sum(scores['class_IoU'].values()) / tasks[t] == pytest.approx(scores['mIoU'], rel=1e-12)
        pred, gt = out[t].argmax(1), batch[t]
        for c, name in ((0, data.CLASS_NAMES[dataset][t][0]), (tasks[t] - 1, data.CLASS_NAMES[dataset][t][-1])):
            tp, fp, fn = (((pred == c) & (gt == c)).sum(), ((pred == c) & (gt != c) & (gt != 255)).sum(),
                          ((pred != c) & (gt == c)).sum())
            assert scores['class_IoU'][name] == pytest.approx(100 * tp.item() / (tp + fp + fn).item()), name


def test_metrics_delta_m():
    # semseg +25 % (higher is better), depth rmse 0.5 vs 0.625: -20 % error = +20 % gain
    assert delta_m({'semseg': 50.0, 'depth': 0.5}, {'semseg': 40.0, 'depth': 0.625}) == pytest.approx(22.5)
    assert delta_m({'normals': 20.0}, {'normals': 20.0}) == 0
    with pytest.raises(ValueError, match='no baseline'):
        delta_m({'edge': 70.0}, {})


# ==================================================================================================
# Data (data.py): readers, augmentations, synthetic scenes
# ==================================================================================================

# -------------------------------------------------------------------------------------------------
# NYUD-v2 tree (images/, segmentation/, depth/, normals/, edge/, gt_sets/) with known contents
# -------------------------------------------------------------------------------------------------
_DATA_H, _DATA_W = 6, 8


def _data_nyud_sample(k, h=_DATA_H, w=_DATA_W):
    """Image, stored labels (0 void, 1..40), depth (0 invalid), normals png, edge png of sample k."""
    rng = np.random.default_rng(k)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    seg = np.ones((h, w), np.uint8)  # wall
    seg[:, 4:] = 40
    seg[0, 0] = 0  # void
    depth = np.full((h, w), 2.5, np.float32)
    depth[1, 1] = 0  # invalid
    normal = np.array([0.6, 0.0, -0.8])  # unit, pointing right and at the camera
    normals = np.tile(np.round((normal + 1) / 2 * 255).astype(np.uint8), (h, w, 1))
    normals[2, 2] = 0  # black fill = invalid
    edge = np.zeros((h, w), np.uint8)
    edge[:, 3:5] = 255
    return image, seg, depth, normals, edge


def _data_write_nyud_tree(root, splits=(('train', ('0001', '0002')), ('val', ('0003',))), size=(_DATA_H, _DATA_W)):
    for folder in ('images', 'segmentation', 'depth', 'normals', 'edge', 'gt_sets'):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for split, ids in splits:
        with open(os.path.join(root, 'gt_sets', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(ids) + '\n')
        for id_ in ids:
            image, seg, depth, normals, edge = _data_nyud_sample(int(id_), *size)
            Image.fromarray(image).save(os.path.join(root, 'images', id_ + '.png'))
            Image.fromarray(seg).save(os.path.join(root, 'segmentation', id_ + '.png'))
            np.save(os.path.join(root, 'depth', id_ + '.npy'), depth)
            Image.fromarray(normals).save(os.path.join(root, 'normals', id_ + '.png'))
            Image.fromarray(edge).save(os.path.join(root, 'edge', id_ + '.png'))
    return str(root)


def test_data_nyud_reader_decodes_and_pads(tmp_path):
    root = _data_write_nyud_tree(tmp_path)
    ds = data.NYUD(root, 'val', train=False, size=(8, 16))
    s = ds[0]
    image, seg, depth, normals, edge = _data_nyud_sample(3)
    assert s['meta'] == {'id': '0003', 'size': (_DATA_H, _DATA_W), 'unscored': (), 'read_as': []}  # RGB: read as it is
    assert s['image'].shape == (3, 8, 16) and s['image'].dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    want = (torch.from_numpy(image).permute(2, 0, 1) / 255 - mean) / std
    assert torch.allclose(s['image'][:, :_DATA_H, :_DATA_W], want, atol=1e-5)
    assert (s['image'][:, _DATA_H:] == 0).all() and (s['image'][:, :, _DATA_W:] == 0).all()
    # semseg: stored 1..40 -> 0..39, void 0 -> 255, padding 255
    assert s['semseg'].dtype == torch.int64
    assert s['semseg'][0, 0] == 255 and s['semseg'][1, 0] == 0 and s['semseg'][1, 5] == 39
    assert (s['semseg'][_DATA_H:] == 255).all() and (s['semseg'][:, _DATA_W:] == 255).all()
    # depth in metres, 0 = invalid (and padding)
    assert s['depth'].shape == (1, 8, 16) and s['depth'][0, 1, 1] == 0 and s['depth'][0, 0, 0] == 2.5
    assert (s['depth'][:, _DATA_H:] == 0).all()
    # normals decoded as 2 v / 255 - 1 (the published decoding: black stays (-1, -1, -1)); padding 0
    n = s['normals'][:, :_DATA_H, :_DATA_W]
    assert torch.allclose(n[:, 0, 0], torch.tensor([0.6, 0.0, -0.8]), atol=0.01)
    assert (n[:, 2, 2] == -1).all() and (s['normals'][:, _DATA_H:] == 0).all()
    # val edges: SEISM's boundary of the stored 0/255 map, {0, 1}, padding 255: the 2-px line at
    # columns 3-4 has two borders, columns 2 and 4 (test_data_val_edge_is_seism_ground_truth)
    assert set(s['edge'][0, :_DATA_H, :_DATA_W].unique().tolist()) == {0.0, 1.0}
    assert (s['edge'][0, :_DATA_H, :_DATA_W].sum(0) == torch.tensor([0, 0, _DATA_H, 0, _DATA_H, 0, 0, 0])).all()
    assert (s['edge'][0, _DATA_H:] == 255).all()


def _data_val_edges(reader, h, w):
    """The val reader's edge target of its first image (h, w), and the boundary meter's GT pixel count
    of that image: the meter scores the target as the reader gives it."""
    batch = next(iter(data.eval_loader(reader, 1, workers=0)))
    meters = make_meters(('edge',), reader.dataset)
    data.update_meters(meters, {'edge': torch.zeros(1, 1, *batch['edge'].shape[-2:])}, batch)
    return batch['edge'][0, 0, :h, :w].numpy(), set(meters['edge'].counts[:, 3].tolist())


def _data_nyud_edge_maps():
    """Stored NYUD edge maps (0/255, and one with a third value) (12, 16), by name."""
    two_px = np.zeros((12, 16), np.uint8)
    two_px[:, 6:8] = 255
    tee = np.zeros((12, 16), np.uint8)
    tee[5, :] = tee[5:, 9] = 255  # a T: three regions meet at the junction
    three = np.zeros((12, 16), np.uint8)
    three[:, 8:] = 255
    three[7:, 5:11] = 128  # three labels meet at (7, 7) and (7, 10)
    return {'2-px line': two_px, 'T junction': tee, 'three labels': three}


@pytest.mark.parametrize('name', ['2-px line', 'T junction', 'three labels'])
def test_data_val_edge_is_seism_ground_truth(tmp_path, name):
    """NYUD: the val reader's edge target, which the boundary meter scores against, is what SEISM
    builds from the stored edge/<id>.png (gt_wrappers/db_gt.m, piotr_edges/edgesEvalImg.m):
    bwmorph(seg2bmap(png), 'thin', Inf); the train split keeps the training target png > 127."""
    stored = _data_nyud_edge_maps()[name]
    root = _data_write_nyud_tree(tmp_path, size=stored.shape)
    for id_ in ('0001', '0003'):  # a train and the val image
        Image.fromarray(stored).save(os.path.join(root, 'edge', id_ + '.png'))
    want = data.thin(_seism_seg2bmap(stored))
    target, gt_pixels = _data_val_edges(data.NYUD(root, 'val', train=False, size=(16, 16), tasks=('edge',)), 12, 16)
    assert np.array_equal(target, want) and gt_pixels == {want.sum()}
    if name == '2-px line':  # two boundaries, one each side, not the line itself
        assert np.array_equal(target.sum(0).nonzero()[0], [5, 7])
    train_target = data.NYUD(root, 'train', train=False, size=(16, 16), tasks=('edge',))[0]['edge'][0, :12, :16]
    assert np.array_equal(train_target.numpy(), stored > 127)


def test_data_pascal_val_edge_is_seism_ground_truth(tmp_path):
    """PASCAL-Context: the val edge target is SEISM's boundary of the LabelMap, thin(seg2bmap), where
    training keeps thin(|Laplacian| > 0); they differ at three labels in a row (the Laplacian cancels)."""
    root = _data_write_pascal_tree(tmp_path)
    labelmap = np.full((_DATA_PH, _DATA_PW), 440, np.uint16)
    labelmap[4:, :5], labelmap[4:, 5:] = 20, 30  # a junction of three labels at (4, 5)
    labelmap[:2, 3], labelmap[:2, 4:] = 450, 460  # 440 450 460 in a row
    for id_ in ('2008_000001', '2008_000003'):  # a train and the val image
        scipy.io.savemat(os.path.join(root, 'pascal-context', 'trainval', id_ + '.mat'), {'LabelMap': labelmap})
    want = data.thin(_seism_seg2bmap(labelmap))
    reader = data.PASCALContext(root, 'val', train=False, size=(16, 16), tasks=('edge',))
    target, gt_pixels = _data_val_edges(reader, _DATA_PH, _DATA_PW)
    assert np.array_equal(target, want) and gt_pixels == {want.sum()}
    train_target = data.PASCALContext(root, 'train', train=False, size=(16, 16), tasks=('edge',))[0]['edge']
    assert np.array_equal(train_target[0, :_DATA_PH, :_DATA_PW].numpy(), data.labelmap_edges(labelmap))
    assert not np.array_equal(want, data.labelmap_edges(labelmap))


def test_data_nyud_task_subset_and_unknown_task(tmp_path):
    root = _data_write_nyud_tree(tmp_path)
    s = data.NYUD(root, 'val', train=False, size=(8, 8), tasks=('depth',))[0]
    assert set(s) == {'image', 'depth', 'meta'}
    with pytest.raises(ValueError, match='sal'):
        data.NYUD(root, 'val', tasks=('sal',))


def test_data_hflip_negates_normals_x():
    sample = {'image': np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
              'normals': np.tile(np.array([0.6, 0.0, -0.8], np.float32), (2, 3, 1)),
              'semseg': np.array([[0, 1, 2], [3, 4, 5]], np.uint8)}
    sample['normals'][0, 0] = 0  # invalid stays invalid
    out = data.hflip(sample)
    assert (out['image'] == sample['image'][:, ::-1]).all()
    assert (out['semseg'] == [[2, 1, 0], [5, 4, 3]]).all()
    assert np.allclose(out['normals'][1, 0], [-0.6, 0.0, -0.8]) and (out['normals'][0, 2] == 0).all()


class _DataFixedRng:
    """Stands in for numpy's Generator: uniform -> a fixed value, integers -> low, random -> 0."""

    def __init__(self, value):
        self.value = value

    def uniform(self, lo, hi):
        return self.value

    def integers(self, lo, hi):
        return lo

    def random(self):
        return 0.0


def test_data_random_scale_divides_depth_and_keeps_labels():
    s = {'image': np.zeros((4, 6, 3), np.uint8), 'depth': np.full((4, 6), 3.0, np.float32),
         'semseg': np.array([[0, 1, 2, 3, 4, 255]] * 4, np.uint8)}
    out = data.random_scale(s, _DataFixedRng(2.0))
    assert out['image'].shape == (8, 12, 3) and out['semseg'].shape == (8, 12)
    assert np.allclose(out['depth'], 1.5)  # twice as large looks twice as close
    assert (out['semseg'][0] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 255, 255]).all()  # nearest, no new values


def test_data_random_crop_redraws_dominated_windows():
    seg = np.zeros((40, 40), np.uint8)
    seg[:, 30:] = 1  # only windows reaching x >= 30 have <= 75 % of class 0
    s = {'image': np.zeros((40, 40, 3), np.uint8), 'semseg': seg}
    rng = np.random.default_rng(0)
    for _ in range(20):
        crop = data.random_crop(s, (10, 12), rng, tries=50)['semseg']
        assert crop.shape == (10, 12) and (crop == 0).mean() < 0.75
    # void pixels are no class: a window 3/4 void, the rest two classes half and half, is kept at once
    seg = np.full((4, 4), 255, np.uint8)
    seg[0, :2], seg[0, 2:] = 1, 2
    draws = []  # the offsets drawn: 2 per window
    rng = types.SimpleNamespace(integers=lambda lo, hi: draws.append(lo) or lo)
    data.random_crop({'image': np.zeros((4, 4, 3), np.uint8), 'semseg': seg}, (4, 4), rng)
    assert len(draws) == 2


class _DataScriptedRng:
    """Stands in for numpy's Generator in photometric: random() answers from a script (< 0.5: the step
    is taken), integers() its low or its high end, uniform() a fixed value."""

    def __init__(self, script, high=False, value=1.0):
        self.script, self.high, self.value = list(script), high, value

    def random(self):
        return self.script.pop(0)

    def integers(self, lo, hi):
        return hi - 1 if self.high else lo

    def uniform(self, lo, hi):
        return self.value


def _data_hue(rgb):
    """The hue in degrees of a uint8 RGB colour."""
    import colorsys
    return 360 * colorsys.rgb_to_hsv(*(np.asarray(rgb, np.float64) / 255))[0]


def test_data_photometric_hue_is_the_references_plus_minus_36_degrees():
    """The reference shifts hue by randint(-18, 17) OpenCV units of 2 degrees: -36 ... +34 degrees, as
    its only step here (brightness, contrast, saturation not taken). The output stays 0..255 integers."""
    image = np.tile(np.array([200, 40, 40], np.uint8), (4, 4, 1))  # red, hue 0
    # the script: no brightness, contrast last, no saturation, hue, no contrast
    for high, want in ((False, -36.0), (True, 34.0)):
        out = data.photometric(image, _DataScriptedRng([0.9, 0.9, 0.9, 0.1, 0.9], high=high))
        got = (_data_hue(out[0, 0]) + 180) % 360 - 180
        assert abs(got - want) <= 1.5, (high, got)  # PIL's hue steps are 360 / 255 = 1.4 degrees
        assert out.dtype == np.float32 and (out == np.round(out)).all()
    # contrast (x 1.5) is taken in either place: first (after brightness) or last
    bright = dict(value=1.5)
    first = data.photometric(image, _DataScriptedRng([0.9, 0.1, 0.1, 0.9, 0.9], **bright))
    last = data.photometric(image, _DataScriptedRng([0.9, 0.9, 0.9, 0.9, 0.1], **bright))
    assert (first == last).all() and (first[0, 0] == [255, 60, 60]).all()  # x 1.5, truncated at 255


def test_data_train_sample_is_seeded_and_sized(tmp_path):
    root = _data_write_nyud_tree(tmp_path)
    a = data.NYUD(root, 'train', train=True, size=(8, 10), seed=3)
    b = data.NYUD(root, 'train', train=True, size=(8, 10), seed=3)
    for i in range(2):
        sa, sb = a[i], b[i]
        assert sa['image'].shape == (3, 8, 10) and sa['semseg'].shape == (8, 10)
        for k in ('image', 'semseg', 'depth', 'normals', 'edge'):
            assert torch.equal(sa[k], sb[k])
        assert set(sa['semseg'].unique().tolist()) <= {0, 39, 255}
        h, w = sa['meta']['size']
        assert (sa['semseg'][h:] == 255).all() and (sa['semseg'][:, w:] == 255).all()


def test_data_collate_and_training_stream(tmp_path):
    root = _data_write_nyud_tree(tmp_path)
    ds = data.NYUD(root, 'train', train=True, size=(8, 10))
    batch = next(iter(data.train_loader(ds, 2, rank=0, world=1, seed=0, start=0, stop=1, workers=0)))
    assert batch['image'].shape == (2, 3, 8, 10) and batch['semseg'].shape == (2, 8, 10)
    assert batch['depth'].shape == (2, 1, 8, 10) and isinstance(batch['meta'], list) and len(batch['meta']) == 2
    # the stream is a function of (seed, step): with worker processes or without, from step 0 or resumed
    ds.ids = ['0001', '0001']  # one image twice: each (epoch, index) must be augmented differently

    def images(seed, start, workers):
        return [b['image'] for b in data.train_loader(ds, 1, rank=0, world=1, seed=seed, start=start, stop=4,
                                                      workers=workers)]
    run = images(5, 0, 0)
    assert all(torch.equal(x, y) for x, y in zip(run, images(5, 0, 2)))
    assert all(torch.equal(x, y) for x, y in zip(run[2:], images(5, 2, 0)))
    assert not torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2]) and not torch.equal(run[0], images(6, 0, 0)[0])
    # two processes read disjoint halves of each global batch
    halves = [[m['id'] for b in data.train_loader(data.NYUD(root, 'train', size=(8, 10)), 2, rank=r, world=2,
                                                  seed=0, start=0, stop=1, workers=0) for m in b['meta']] for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 1 and halves[0] != halves[1]


# -------------------------------------------------------------------------------------------------
# PASCAL-Context tree with .mat files in the real struct layouts
# -------------------------------------------------------------------------------------------------
_DATA_PH, _DATA_PW = 8, 10
_DATA_WALL, _DATA_AEROPLANE = 440, 2  # context ids: 'wall' is an NYU class, 'aeroplane' is not


def _data_anno(objects, shape):
    """The human_parts/<id>.mat `anno` struct: imname, objects (class, class_ind, mask, parts), each
    part (part_name, mask); an object without parts has an empty `parts` array, as MATLAB saves it."""
    objs = np.zeros((1, len(objects)), dtype=[('class', 'O'), ('class_ind', 'O'), ('mask', 'O'), ('parts', 'O')])
    for j, (name, ind, parts) in enumerate(objects):
        p = np.zeros((0, 0))
        if parts:
            p = np.zeros((1, len(parts)), dtype=[('part_name', 'O'), ('mask', 'O')])
            for k, (part_name, mask) in enumerate(parts):
                p[0, k] = (part_name, mask.astype(np.uint8))
        mask = np.zeros(shape, np.uint8)
        for _, m in parts:
            mask |= m.astype(np.uint8)
        objs[0, j] = (name, np.array([[ind]], np.uint8), mask, p)
    anno = np.zeros((1, 1), dtype=[('imname', 'O'), ('objects', 'O')])
    anno[0, 0] = ('image.jpg', objs)
    return anno


def _data_part_masks():
    head, arm, foot, cat_head = (np.zeros((_DATA_PH, _DATA_PW), bool) for _ in range(4))
    head[0:2, 0:2] = True
    arm[2:4, 0:2] = True
    foot[6:8, 0:2] = True
    cat_head[0:2, 8:10] = True
    return head, arm, foot, cat_head


def _data_write_pascal_tree(root):
    r = str(root)
    for folder in ('JPEGImages', 'ImageSets/Context', 'semseg/VOC12', 'semseg/pascal-context',
                   'pascal-context/trainval', 'human_parts', 'normals_distill', 'sal_distill'):
        os.makedirs(os.path.join(r, folder), exist_ok=True)
    ids = {'train': ['2008_000001', '2008_000002'], 'val': ['2008_000003']}
    for split, split_ids in ids.items():
        with open(os.path.join(r, 'ImageSets', 'Context', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(split_ids) + '\n')
    head, arm, foot, cat_head = _data_part_masks()
    for k, id_ in enumerate(ids['train'] + ids['val']):
        Image.fromarray(np.full((_DATA_PH, _DATA_PW, 3), 100 + 20 * k, np.uint8)).save(os.path.join(r, 'JPEGImages', id_ + '.jpg'))
        seg = np.full((_DATA_PH, _DATA_PW), 15, np.uint8)
        seg[0, 0] = 255
        # the first image has a VOC12 mask, the others only the Context-derived one
        folder = 'VOC12' if k == 0 else 'pascal-context'
        Image.fromarray(seg if k == 0 else seg * 0 + 7).save(os.path.join(r, 'semseg', folder, id_ + '.png'))
        labelmap = np.full((_DATA_PH, _DATA_PW), _DATA_WALL, np.uint16)
        labelmap[:, 5:] = _DATA_AEROPLANE
        scipy.io.savemat(os.path.join(r, 'pascal-context', 'trainval', id_ + '.mat'), {'LabelMap': labelmap})
        if k == 0:  # two persons (one without parts) and a cat with a part
            objects = [('person', 15, [('head', head), ('ruarm', arm), ('lfoot', foot)]),
                       ('person', 15, []), ('cat', 8, [('head', cat_head)])]
        else:
            objects = [('cat', 8, [('head', cat_head)])]
        scipy.io.savemat(os.path.join(r, 'human_parts', id_ + '.mat'), {'anno': _data_anno(objects, (_DATA_PH, _DATA_PW))})
        normals = np.tile(np.array([128, 128, 0], np.uint8), (_DATA_PH, _DATA_PW, 1))  # (0, 0, -1)
        Image.fromarray(normals).save(os.path.join(r, 'normals_distill', id_ + '.png'))
        sal = np.zeros((_DATA_PH, _DATA_PW), np.uint8)
        sal[:, :3] = 200
        sal[:, 3] = 120  # below 0.5 * 255
        Image.fromarray(sal).save(os.path.join(r, 'sal_distill', id_ + '.png'))
    return r


def test_data_pascal_parts_are_read_as_the_reference_indexes_the_struct(tmp_path):
    """The reference readers index the `anno` struct by position (['anno'][0][0][1][0] the objects, obj[1]
    the class index, obj[3][0][k] a part as (name, mask)); our reader, by field names, gives the map
    that indexing gives."""
    root = _data_write_pascal_tree(tmp_path)
    path = os.path.join(root, 'human_parts', '2008_000001.mat')
    want = np.zeros((_DATA_PH, _DATA_PW), np.uint8)
    for obj in scipy.io.loadmat(path)['anno'][0][0][1][0]:
        if obj[1][0][0] == data.PERSON_CLASS and len(obj[3]):
            for name, mask in obj[3][0]:
                want[mask.astype(bool)] = data.HUMAN_PART_GROUPS[str(name[0])]
    got, has_human = data.human_parts_from_anno(path, (_DATA_PH, _DATA_PW))
    assert has_human and np.array_equal(got, want) and {1, 3, 6} <= set(np.unique(got).tolist())


# PASCAL-Part's 24 person parts in their part-id order (1..24), and the 6 groups the multi-task
# readers train and score (InvPT / ATRC data/pascal_context.py, HUMAN_PART[6]), group id = position + 1
_DATA_PERSON_PARTS = ('head', 'leye', 'reye', 'lear', 'rear', 'lebrow', 'rebrow', 'nose', 'mouth', 'hair', 'torso',
                      'neck', 'llarm', 'luarm', 'lhand', 'rlarm', 'ruarm', 'rhand', 'llleg', 'luleg', 'lfoot', 'rlleg',
                      'ruleg', 'rfoot')
_DATA_PART_GROUPS = (('head', 'hair head lear lebrow leye mouth nose rear rebrow reye'), ('torso', 'neck torso'),
                     ('upper arms', 'luarm ruarm'), ('lower arms and hands', 'lhand llarm rhand rlarm'),
                     ('upper legs', 'luleg ruleg'), ('lower legs and feet', 'lfoot llleg rfoot rlleg'))


def test_data_pascal_every_person_part_reads_as_its_group(tmp_path):
    """A person carrying all 24 PASCAL-Part person parts, one pixel each: each pixel reads as its
    part's group of the official mapping (7 classes with the background, named as the meter names
    them); a second person's parts drawn over the first's win, as the reference draws them in order;
    another object's parts and the pixels of no part are background; a part name that is not a
    person's is refused."""
    group_of = {p: g for g, (_, parts) in enumerate(_DATA_PART_GROUPS, 1) for p in parts.split()}
    assert sorted(group_of) == sorted(_DATA_PERSON_PARTS) and len(_DATA_PERSON_PARTS) == 24
    assert data.HUMAN_PARTS == ('background',) + tuple(name for name, _ in _DATA_PART_GROUPS)
    assert data.CLASS_NAMES['pascal']['human_parts'] == data.HUMAN_PARTS and TASKS['pascal']['human_parts'] == 7
    shape = (5, 6)
    pixel = {p: np.arange(30).reshape(shape) == k for k, p in enumerate(_DATA_PERSON_PARTS)}
    over = np.zeros(shape, bool)
    over[0, 0] = True  # the first person's head, then the second person's right foot
    cat = np.zeros(shape, bool)
    cat[4, 5] = True
    objects = [('person', 15, [(p, pixel[p]) for p in _DATA_PERSON_PARTS]), ('person', 15, [('rfoot', over)]),
               ('cat', 8, [('head', cat)])]
    path = str(tmp_path / 'parts.mat')
    scipy.io.savemat(path, {'anno': _data_anno(objects, shape)})
    got, has_human = data.human_parts_from_anno(path, shape)
    assert has_human and got.dtype == np.uint8
    want = np.zeros(shape, np.uint8)
    for p in _DATA_PERSON_PARTS[1:]:
        want[pixel[p]] = group_of[p]
    want[0, 0] = group_of['rfoot']
    assert np.array_equal(got, want), (got, want)
    assert {data.HUMAN_PARTS[got[pixel[p]][0]] for p in ('lhand', 'rlarm')} == {'lower arms and hands'}
    scipy.io.savemat(path, {'anno': _data_anno([('person', 15, [('lwing', pixel['head'])])], shape)})
    with pytest.raises(data.DataError, match="unknown person part 'lwing'"):
        data.human_parts_from_anno(path, shape)


def test_data_pascal_semseg_classes_are_vocs_in_id_order():
    """PASCAL-Context's semseg ids are VOC's (InvPT / ATRC data/pascal_context.py, VOC_CATEGORY_NAMES):
    the names the meter and the exports give each id, and the person's id that the parts decoder reads."""
    voc = ('background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike '
           'person pottedplant sheep sofa train tvmonitor').split()
    assert list(data.CLASS_NAMES['pascal']['semseg']) == voc and TASKS['pascal']['semseg'] == len(voc)
    assert voc[data.PERSON_CLASS] == 'person'


def test_data_pascal_reader_decodes(tmp_path):
    root = _data_write_pascal_tree(tmp_path)
    ds = data.PASCALContext(root, 'train', train=False, size=(16, 16))
    s = ds[0]
    assert s['meta'] == {'id': '2008_000001', 'size': (_DATA_PH, _DATA_PW), 'unscored': (), 'read_as': []}
    assert s['semseg'][0, 0] == 255 and s['semseg'][1, 1] == 15 and (s['semseg'][_DATA_PH:] == 255).all()
    hp = s['human_parts']
    assert hp[0, 0] == 1 and hp[2, 0] == 3 and hp[7, 0] == 6  # head, upper arm, foot
    assert hp[0, 9] == 0 and hp[4, 4] == 0  # the cat's head and elsewhere: background
    assert (hp[_DATA_PH:] == 255).all()
    assert (s['sal'][0, :_DATA_PH, :3] == 1).all() and (s['sal'][0, :_DATA_PH, 3:_DATA_PW] == 0).all()
    assert (s['sal'][0, _DATA_PH:] == 255).all()
    # normals kept on the wall (an NYU class), 0 on the aeroplane
    assert torch.allclose(s['normals'][:, 0, 0], torch.tensor([0.0, 0.0, -1.0]), atol=0.01)
    assert (s['normals'][:, :, 5:] == 0).all()
    # edge: the one-pixel-wide thinned border between the two LabelMap regions
    e = s['edge'][0, :_DATA_PH, :_DATA_PW]
    assert set(e.unique().tolist()) == {0.0, 1.0}
    assert (e.sum(1)[1:] == 1).all() and set(e.nonzero()[:, 1].tolist()) <= {4, 5}  # the top end is thinned away
    # the second image: Context semseg, no person
    s = ds[1]
    assert s['semseg'][1, 1] == 7 and s['meta']['unscored'] == ('human_parts',)  # no person
    assert (s['human_parts'][:_DATA_PH, :_DATA_PW] == 0).all()


def test_data_pascal_normal_classes():
    """Context classes named in both class tables, less 'unknown' (431), plus 'tvmonitor' (427)."""
    ids = set(data.PASCAL_NORMAL_CLASSES)
    assert len(ids) == 170 and {427, 440, 158, 68} <= ids and not {431, 459, _DATA_AEROPLANE} & ids


def test_data_pascal_crop_without_parts_is_ignored(tmp_path):
    root = _data_write_pascal_tree(tmp_path)
    ds = data.PASCALContext(root, 'train', train=True, size=(4, 4), tasks=('human_parts',), seed=0)
    seen = set()
    for _ in range(30):
        hp = ds[0]['human_parts']
        valid = hp[hp != 255]
        if valid.numel() == 0:
            seen.add('ignored')
        else:
            assert ((valid > 0) & (valid < 7)).any()  # any crop kept as labels has a part pixel
            seen.add('kept')
    assert seen == {'ignored', 'kept'}


def test_data_nyud_black_and_grey_normals_count_as_the_published_meter_counts(tmp_path):
    # a NYUD normals file where some normals could not be computed: stored black (0, 0, 0) and grey
    # (128, 128, 128). The published loss / meter count them as -(1,1,1)/sqrt3 and +(1,1,1)/sqrt3.
    root = _data_write_nyud_tree(tmp_path, splits=(('val', ('0003',)),))
    stored = np.tile(np.array([128, 128, 255], np.uint8), (_DATA_H, _DATA_W, 1))  # ~(0, 0, 1)
    stored[0, :2] = 0  # two black pixels
    stored[1, :3] = 128  # three grey pixels
    Image.fromarray(stored).save(os.path.join(root, 'normals', '0003.png'))
    s = data.NYUD(root, 'val', train=False, size=(8, 16), tasks=('normals',))[0]
    target = s['normals'][None, :, :_DATA_H, :_DATA_W]
    pred = torch.zeros_like(target)
    pred[:, 2] = 1  # every pixel predicts (0, 0, 1)
    m = NormalsMeter()
    m.update(pred, target)
    score = m.score()
    n_all = _DATA_H * _DATA_W
    lean = math.degrees(math.acos(1 / math.sqrt(3)))  # (0, 0, 1) vs +(1, 1, 1): 54.7 deg
    rounding = math.degrees(math.atan(math.sqrt(2) / 255))  # the others, stored (1/255, 1/255, 1): 0.32 deg
    want = (2 * (180 - lean) + 3 * lean + (n_all - 5) * rounding) / n_all
    assert score['mean'] == pytest.approx(want, abs=1e-3)
    assert score['strict_mean'] == pytest.approx(rounding, abs=1e-3)  # only the plausible unit normals
    assert s['normals'][:, 1, 0].tolist() == pytest.approx([1 / 255] * 3, rel=1e-4)  # grey: not 0, so counted
    # the loss counts them too, against the decoded vector: L1 over the 3 components per valid pixel
    loss = MultiTaskLoss({'normals': 3}).task_loss('normals', pred, target)
    want = (2 * 4 + 3 * (2 / 255 + 254 / 255) + (n_all - 5) * 2 / 255) / n_all  # black: 1+1+2; grey
    assert loss.item() == pytest.approx(want, rel=1e-4)


def test_data_pascal_person_free_training_image_ignores_parts(tmp_path):
    root = _data_write_pascal_tree(tmp_path)
    ds = data.PASCALContext(root, 'train', train=True, size=(4, 4), tasks=('human_parts',), seed=0)
    for seed in range(5):  # whatever the crop, an image without a person says nothing about parts
        ds.rng = np.random.default_rng(seed)
        assert (ds[1]['human_parts'] == 255).all()  # 2008_000002: only a cat
    val = data.PASCALContext(root, 'val', train=False, size=(16, 16), tasks=('human_parts',))
    assert not (val[0]['human_parts'][:_DATA_PH, :_DATA_PW] == 255).all()  # evaluation skips it by meta


def test_data_thin_matches_reference_thinning():
    """Expected output of skimage.morphology.thin (the reference's thinning) on this shape; our
    numpy version agreed with it on 300 random masks when it was written."""
    m = np.zeros((8, 10), bool)
    m[1:4, 1:9] = True
    m[3:7, 5:8] = True
    m[6, 1:3] = True
    want = ['0000000000', '0000000000', '0011100000', '0000010000',
            '0000001000', '0000001000', '0110000000', '0000000000']
    assert [''.join(str(int(v)) for v in row) for row in data.thin(m)] == want
    line = np.zeros((5, 5), bool)
    line[2, :] = True
    assert (data.thin(line) == line).all()
    # two label regions: |Laplacian| > 0 marks both sides of the border, thinning keeps one
    label = np.zeros((6, 6))
    label[:, 3:] = 4
    assert (data.labelmap_edges(label) == (np.arange(6)[:, None] > 0) & (np.arange(6) == 2)).all()


# -------------------------------------------------------------------------------------------------
# Errors: one line naming the path, catchable as FileNotFoundError and ValueError
# -------------------------------------------------------------------------------------------------


def test_data_missing_root_and_split(tmp_path):
    with pytest.raises(data.DataError, match='nowhere.*README.md') as e:
        data.NYUD(str(tmp_path / 'nowhere'))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    assert '\n' not in str(e.value)
    root = _data_write_nyud_tree(tmp_path)
    with pytest.raises(data.DataError, match='gt_sets.test.txt: split file not found'):
        data.NYUD(root, 'test')
    with pytest.raises(data.DataError, match='Context.train.txt: split file not found'):
        data.PASCALContext(root)


def test_data_missing_and_unreadable_files(tmp_path):
    root = _data_write_nyud_tree(tmp_path)
    os.remove(os.path.join(root, 'depth', '0002.npy'))
    with pytest.raises(data.DataError, match=r'depth.0002\.npy: file not found \(1 of the 10'):
        data.NYUD(root, 'train')
    data.NYUD(root, 'train', tasks=('semseg', 'normals', 'edge'))  # depth not needed: fine
    with open(os.path.join(root, 'normals', '0003.png'), 'wb') as f:
        f.write(b'not a png')
    with pytest.raises(data.DataError, match=r'normals.0003\.png: cannot read it'):
        data.NYUD(root, 'val', train=False, size=(8, 8))[0]
    Image.fromarray(np.full((_DATA_H, _DATA_W), 41, np.uint8)).save(os.path.join(root, 'segmentation', '0003.png'))
    with pytest.raises(data.DataError, match=r'segmentation.0003\.png: label 41 outside 0..40'):
        data.NYUD(root, 'val', train=False, size=(8, 8), tasks=('semseg',))[0]
    colour = np.zeros((_DATA_H, _DATA_W, 3), np.uint8)
    colour[:, 3, 0] = 255  # a red line: no edge map
    Image.fromarray(colour).save(os.path.join(root, 'edge', '0003.png'))
    with pytest.raises(data.DataError, match=r'edge.0003\.png: a colour image; edge maps are one-channel'):
        data.NYUD(root, 'val', train=False, size=(8, 8), tasks=('edge',))[0]
    proot = _data_write_pascal_tree(tmp_path / 'pascal')
    os.remove(os.path.join(proot, 'human_parts', '2008_000003.mat'))
    with pytest.raises(data.DataError, match=r'human_parts.2008_000003\.mat: file not found'):
        data.PASCALContext(proot, 'val')
    scipy.io.savemat(os.path.join(proot, 'pascal-context', 'trainval', '2008_000003.mat'), {'Other': np.zeros(3)})
    with pytest.raises(data.DataError, match="2008_000003.mat: has no 'LabelMap'"):
        data.PASCALContext(proot, 'val', train=False, tasks=('edge',))[0]


def test_data_split_files_and_annotations_a_reader_cannot_trust_are_one_line_errors(tmp_path):
    """Split files as a user's editor may save them, and a PASCAL-Part .mat of another layout: a
    DataError naming the file, never a traceback; a byte-order mark is read as UTF-8's."""
    root = _data_write_nyud_tree(tmp_path / 'nyud')
    split = os.path.join(root, 'gt_sets', 'val.txt')
    open(split, 'wb').write('\ufeff0003\r\n'.encode('utf-8'))  # Windows Notepad: BOM and CRLF
    assert data.NYUD(root, 'val', train=False).ids == ['0003']
    for text, error in (('0003\n0003\n'.encode(), 'id 0003 is listed twice'), (b'0003\n\xff\xfe\n', 'not UTF-8')):
        open(split, 'wb').write(text)
        with pytest.raises(data.DataError, match=error) as e:
            data.NYUD(root, 'val', train=False)
        assert split in str(e.value) and '\n' not in str(e.value)
    pascal = _data_write_pascal_tree(tmp_path / 'pascal')
    ds = data.PASCALContext(pascal, 'val', train=False, size=(16, 16), tasks=('human_parts',))
    path = ds.path('human_parts', ds.ids[0])
    scipy.io.savemat(path, {'anno': {'imname': 'x', 'parts': []}})  # a struct without its objects
    with pytest.raises(data.DataError, match='not a PASCAL-Part annotation') as e:
        ds.load(0)
    assert path in str(e.value) and '\n' not in str(e.value)


def test_data_greyscale_and_palette_images_are_read_as_rgb_and_said_once(tmp_path, capsys):
    root = _data_write_nyud_tree(tmp_path)
    for id_ in ('0001', '0002'):  # greyscale photos: read as RGB, said once for the split
        path = os.path.join(root, 'images', f'{id_}.png')
        grey = np.asarray(Image.open(path).convert('L'))
        Image.fromarray(grey).save(path)
    ds = data.NYUD(root, 'train', train=False, size=(16, 16))
    ds.check()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith('note:')]
    assert notes == [f'note: 2 image(s) of {root} train: greyscale, read as RGB (grey in R, G, B) '
                     f'(e.g. {os.path.join(root, "images", "0001.png")})'], notes
    image = ds[0]['image'][:, :_DATA_H, :_DATA_W]
    rgb = image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(rgb[0], rgb[1])
    torch.testing.assert_close(rgb[0], rgb[2])


def test_data_image_larger_than_network(tmp_path):
    root = _data_write_nyud_tree(tmp_path)
    with pytest.raises(ValueError, match='larger than the network size'):
        data.NYUD(root, 'val', train=False, size=(4, 4))[0]


# -------------------------------------------------------------------------------------------------
# Synthetic scenes
# -------------------------------------------------------------------------------------------------


def test_data_synthetic_geometry_is_consistent(tmp_path):
    root = data.make_synthetic(str(tmp_path / 'syn'), n_train=2, n_val=2, size=(120, 160), seed=1)
    info = json.load(open(os.path.join(root, 'synthetic.json')))
    fx, fy, cx, cy = info['intrinsics']
    ds = data.NYUD(root, 'val', train=False, size=(128, 160))
    assert len(ds) == 2 and len(data.NYUD(root, 'train', train=False, size=(128, 160))) == 2
    for s in ds:
        seg, depth = s['semseg'][:120].numpy(), s['depth'][0, :120].numpy()
        normals = s['normals'][:, :120].numpy().transpose(1, 2, 0)
        edge = np.asarray(Image.open(os.path.join(root, 'edge', s['meta']['id'] + '.png'))) > 0  # as stored, 0 / 255
        normals = normals / np.linalg.norm(normals, axis=-1, keepdims=True)  # stored as 8-bit, near unit
        valid = depth > 0
        assert valid.mean() > 0.98 and depth[valid].min() >= 0.5 and depth.max() <= 10
        assert (seg != 255).all() and len(np.unique(seg)) >= 3
        # normals from the depth map's 3D points (central differences) agree away from edges
        v, u = np.mgrid[0:120, 0:160]
        p = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], -1)
        n = np.cross(p[1:-1, 2:] - p[1:-1, :-2], p[2:, 1:-1] - p[:-2, 1:-1])
        n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
        n *= -np.sign(np.sum(n * p[1:-1, 1:-1], -1, keepdims=True))  # facing the camera
        near_edge = np.zeros_like(edge, bool)
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-2, -1, 0, 1, 2):
                near_edge |= np.roll(np.roll(edge > 0, dy, 0), dx, 1)
        inner = ~near_edge[1:-1, 1:-1] & valid[1:-1, 1:-1]
        angle = np.degrees(np.arccos(np.clip(np.sum(n * normals[1:-1, 1:-1], -1), -1, 1)))[inner]
        assert np.median(angle) < 1.0 and (angle > 5).mean() < 0.03  # (box creases are no edges)
        # edges are 1 px wide, as NYUD's: hardly a 2x2 block of edge pixels (a 2-px band is made of them)
        blocks = edge[1:, 1:] & edge[1:, :-1] & edge[:-1, 1:] & edge[:-1, :-1]
        assert blocks.sum() < 0.01 * edge.sum()
        # every label change is an edge, marked on its top / left side (seg2bmap), and every edge pixel
        # sits on a label, depth or normal change to its east, south or south-east
        assert edge[:, :-1][seg[:, 1:] != seg[:, :-1]].all() and edge[:-1][seg[1:] != seg[:-1]].all()
        ey, ex = np.nonzero(edge)
        found = np.zeros(len(ey), bool)
        for dy, dx in ((0, 1), (1, 0), (1, 1)):
            y, x = np.clip(ey + dy, 0, 119), np.clip(ex + dx, 0, 159)
            found |= seg[y, x] != seg[ey, ex]
            found |= np.abs(depth[y, x] - depth[ey, ex]) > 0.05 * depth[ey, ex]
            found |= np.sum(normals[y, x] * normals[ey, ex], -1) < 0.9
        assert found.mean() > 0.97


def test_data_synthetic_light_at_the_camera_darkens_with_distance():
    # the lamp sits on the camera: on the floor (one surface, one albedo) farther is darker
    checked = 0
    for i in range(4):
        s = data.render_scene(np.random.default_rng([3, i]), (60, 80))
        floor = (s['labels'] == data.NYU40_CLASSES.index('floor') + 1) & (s['depth'] > 0)
        if floor.sum() > 200:
            r = np.corrcoef(s['image'][floor].mean(-1), s['depth'][floor])[0, 1]
            assert r < -0.5, (i, r)
            checked += 1
    assert checked >= 2  # the scenes drawn do show enough floor to judge


def test_data_synthetic_is_reproducible_and_cached(tmp_path):
    a = data.make_synthetic(str(tmp_path / 'a'), n_train=2, n_val=1, size=(30, 40), seed=7)
    b = data.make_synthetic(str(tmp_path / 'b'), n_train=2, n_val=1, size=(30, 40), seed=7)
    c = data.make_synthetic(str(tmp_path / 'c'), n_train=2, n_val=1, size=(30, 40), seed=8)
    for folder, ext in (('images', '.png'), ('segmentation', '.png'), ('depth', '.npy'), ('normals', '.png'), ('edge', '.png')):
        for id_ in ('0000', '0001', '0002'):
            files = [open(os.path.join(r, folder, id_ + ext), 'rb').read() for r in (a, b)]
            assert files[0] == files[1]
    assert open(os.path.join(a, 'images', '0000.png'), 'rb').read() != open(os.path.join(c, 'images', '0000.png'), 'rb').read()
    assert open(os.path.join(a, 'gt_sets', 'val.txt')).read() == '0002\n'
    # a complete folder with the same parameters is kept, a half-written one is written again
    image = os.path.join(a, 'images', '0000.png')
    os.remove(image)
    data.make_synthetic(a, n_train=2, n_val=1, size=(30, 40), seed=7)
    assert not os.path.exists(image)
    info = json.load(open(os.path.join(a, 'synthetic.json')))
    json.dump(dict(info, complete=False), open(os.path.join(a, 'synthetic.json'), 'w'))
    data.make_synthetic(a, n_train=2, n_val=1, size=(30, 40), seed=7)
    assert os.path.exists(image)
    open(os.path.join(a, 'synthetic.json'), 'w').close()  # a marker cut short by a kill or a full disk
    os.remove(image)
    data.make_synthetic(a, n_train=2, n_val=1, size=(30, 40), seed=7)
    assert os.path.exists(image) and json.load(open(os.path.join(a, 'synthetic.json')))['complete']
    # a folder holding some other dataset is never overwritten
    with pytest.raises(data.DataError, match='did not write'):
        data.make_synthetic(_data_write_nyud_tree(tmp_path / 'real'), n_train=1, n_val=1)


# ==================================================================================================
# Training: train.py
# ==================================================================================================

HERE = os.path.dirname(os.path.abspath(__file__))
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS='1')  # subprocesses: 2 shared cores, no oversubscription


@pytest.fixture(scope='module', autouse=True)
def _train_one_thread():
    """One intra-op thread while the suite runs: on a shared 2-core machine, spinning threads of
    several processes slow each step several-fold. Module scope: the shared run uses it too, so its
    losses are comparable bit for bit (results depend on the thread count)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train_tiny_args(data_root, out_dir, *extra):
    """A tiny synthetic run: 6 train / 2 val scenes at 64x96, tiny ViT tapped at blocks 3 and 6 (the
    blocks after the last tap are not run), narrow experts; boundaries scored in the training process
    (a pool of workers costs seconds to start)."""
    return ['--dataset', 'synthetic', '--data-root', str(data_root), '--scenes', '6', '2',
            '--out-dir', str(out_dir), '--img-size', '64', '96', '--backbone', 'tiny', '--taps', '3', '6',
            '--num-experts', '4', '--expert-dim', '32', '--batch-size', '2', '--lr', '1e-3', '--warmup', '2',
            '--log-every', '1', '--workers', '0', '--eval-workers', '0', *extra]


def _train_losses(out_dir):
    with open(os.path.join(out_dir, 'train.jsonl')) as f:
        return [json.loads(line) for line in f]


def _train_board(out_dir):
    """A run folder's TensorBoard events as the viewer reads them (tensorboard's EventAccumulator: the
    events a resumed run's purge_step drops are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(out_dir), size_guidance={'scalars': 0, 'images': 0, 'tensors': 0})
    return board.Reload()


def _board_steps(board, tag):
    return [e.step for e in board.Scalars(tag)]


@pytest.fixture(scope='module')
def _train_run(tmp_path_factory):
    """One finished 6-step run (evaluated and saved at steps 3 and 6), shared by several tests."""
    root = tmp_path_factory.mktemp('train')
    train.main(_train_tiny_args(root / 'data', root / 'run', '--max-iters', '6', '--eval-every', '3'))
    return root


@pytest.mark.heavy
def test_train_writes_outputs_and_lowers_the_loss(_train_run, tmp_path, capsys):
    run = _train_run / 'run'
    for name in ('config.json', 'train.jsonl', 'metrics.jsonl', 'last.pt', 'best.pt', 'best.safetensors', 'gates.png',
                 'curves.png'):
        assert (run / name).is_file(), name
    with Image.open(run / 'curves.png') as im:  # a column per task: loss above the main metric
        assert im.size == (4 * 250, 2 * 150)
    assert len(os.listdir(run / 'vis')) == 2  # both val images drawn
    evals = [json.loads(line) for line in open(run / 'metrics.jsonl')]
    assert [e['step'] for e in evals if 'semseg' in e] == [3, 6]
    assert set(evals[0]['gate_memory']) == {'block6'}  # memory slot exists from the second tap on
    gates = evals[0]['gates']  # mean weights of the 4 experts, then of the memory
    assert [len(gates[b]['edge']) for b in ('block3', 'block6')] == [4, 5]
    assert gates['block6']['edge'][-1] == evals[0]['gate_memory']['block6']['edge']
    ckpt = torch.load(run / 'last.pt', weights_only=True)
    assert ckpt['step'] == 6 and ckpt['config']['img_size'] == [64, 96] and len(ckpt['rng']) == 1
    # TensorBoard: every task's loss at each log step, each main metric at each evaluation, the pictures
    board = _train_board(run)
    for t in TASKS['nyud']:
        assert _board_steps(board, f'train/{t}') == list(range(1, 7))
        assert _board_steps(board, f'{t}/{TASK_TABLE[t].metric}') == [3, 6]
    assert [e.value for e in board.Scalars('edge/odsF')] == pytest.approx(
        [e['edge']['odsF'] for e in evals if 'edge' in e])
    assert {'gates', 'panels/0006', 'panels/0007'} <= set(board.Tags()['images']) and 'config/text_summary' in board.Tags()['tensors']
    assert _board_steps(board, 'input_blind/depth/rmse') == [6]  # the input-blind predictors', once
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    # the synthetic defaults weigh depth x5; the logged total is the weighted sum of the task losses
    cfg = json.load(open(run / 'config.json'))
    weights = cfg['loss_weights']
    assert weights == {'semseg': 1.0, 'depth': 5.0, 'normals': 10.0, 'edge': 50.0}
    # each step's Adam ran at the schedule's lr: the one logged with it, the one the last step left in Adam
    assert [r['lr'] for r in _train_losses(run)] == [train.lr_at(r['step'] - 1, cfg) for r in _train_losses(run)]
    assert ckpt['optimizer']['param_groups'][0]['lr'] == train.lr_at(5, cfg)
    for r in _train_losses(run):
        assert r['loss'] == pytest.approx(sum(w * r[t] for t, w in weights.items()), rel=1e-5)
    # 30 steps on 2 scenes: the mean loss of the last 10 steps must be well below the first 10's
    capsys.readouterr()
    train.main(_train_tiny_args(tmp_path / 'data', tmp_path / 'fit', '--scenes', '2', '1',
                                '--max-iters', '30', '--eval-every', '30', '--log-every', '10'))
    losses = [r['loss'] for r in _train_losses(tmp_path / 'fit')]
    assert len(losses) == 3 and losses[2] < 0.9 * losses[0], losses
    # the evaluation says how far it is; NYUD scores every task on every val image
    out = capsys.readouterr().out
    assert re.search(r'eval: 1/1 images, [\d.]+ img/s, eta 0:00:00\neval at step 30 \(1 val images, [\d.]+ s, [\d.]+ img/s\):', out), out
    assert 'scored_on' not in json.loads(open(tmp_path / 'fit' / 'metrics.jsonl').readline())


@pytest.mark.heavy
def test_train_resume_equals_uninterrupted_run(_train_run, tmp_path, monkeypatch):
    """Killed after its first checkpoint and resumed, a run trains as an uninterrupted one, bit for bit:
    the same batches, and with drop-path 0.5 the same masks (every RNG state restored)."""
    monkeypatch.setitem(taskexpert.VIT_PRESETS['tiny'], 'drop_path', 0.5)
    args = _train_tiny_args(_train_run / 'data', tmp_path / 'run', '--max-iters', '6', '--eval-every', '3')
    train.main(_train_tiny_args(_train_run / 'data', tmp_path / 'full', '--max-iters', '6', '--eval-every', '3'))
    save = train.save_checkpoint

    def save_then_die(path, *a, **k):  # the process is killed right after its first checkpoint
        save(path, *a, **k)
        if path.endswith('best.pt'):
            raise KeyboardInterrupt

    monkeypatch.setattr(train, 'save_checkpoint', save_then_die)
    with pytest.raises(SystemExit, match='interrupted'):
        train.main(args)
    monkeypatch.setattr(train, 'save_checkpoint', save)
    assert torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)['step'] == 3
    with open(tmp_path / 'run' / 'train.jsonl', 'a') as f:  # a line logged after the checkpoint, then lost
        f.write(json.dumps({'step': 4, 'loss': -1.0}) + '\n')
    train.main(['--resume', str(tmp_path / 'run' / 'last.pt')])
    resumed, full = _train_losses(tmp_path / 'run'), _train_losses(tmp_path / 'full')
    assert [r['step'] for r in resumed] == list(range(1, 7))
    assert [r['loss'] for r in resumed] == [r['loss'] for r in full]  # bit-identical
    assert full != _train_losses(_train_run / 'run')  # (drop-path is on)


@pytest.mark.heavy
def test_train_torchrun_two_cpu_processes(_train_run, tmp_path):
    """Two processes (gloo): the logged losses are the mean over both processes (not rank 0's), as one
    process taking the same micro-batches logs them."""
    # the last MMoE at block 9 of 12 (blocks 10-12 get no gradient), and 2 accumulated micro-batches
    # of 1 image per process (DDP all-reduces on the second only)
    steps = ['--max-iters', '2', '--eval-every', '2', '--batch-size', '4', '--taps', '3', '6', '9']
    args = _train_tiny_args(_train_run / 'data', tmp_path / 'ddp', *steps, '--accum-steps', '2')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', *args], cwd=HERE, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('TaskExpert on synthetic') == 1  # rank 0 alone logs
    assert r.stdout.count('warning: DDP on CPUs (gloo)') == 1 and 'BatchNorm normalises each image' in r.stdout
    ckpt = torch.load(tmp_path / 'ddp' / 'last.pt', weights_only=True)
    assert ckpt['step'] == 2 and len(ckpt['rng']) == 2  # one RNG state per process
    # one process, the 4 images of each step in 4 micro-batches of 1 (BatchNorm per image, as above)
    train.main(_train_tiny_args(_train_run / 'data', tmp_path / 'one', *steps, '--accum-steps', '4'))
    for two, one in zip(_train_losses(tmp_path / 'ddp'), _train_losses(tmp_path / 'one'), strict=True):
        assert two == pytest.approx({**one, 'img_s': two['img_s']}, rel=1e-4), (two, one)
    # its sharded evaluation (one val image per process) scored the saved model: every process used
    # rank 0's BatchNorm statistics, not its own
    train.main(['--eval-only', '--checkpoint', str(tmp_path / 'ddp' / 'last.pt'), '--out-dir', str(tmp_path / 'eval'),
                '--eval-workers', '0'])
    ddp, one = (json.loads(open(tmp_path / d / 'metrics.jsonl').readline()) for d in ('ddp', 'eval'))
    for t in ('semseg', 'depth', 'normals', 'edge'):
        assert ddp[t] == _metrics_approx(one[t], rel=1e-6), t


@pytest.mark.heavy
@pytest.mark.parametrize('launcher', ['torchrun', 'by hand'])
def test_train_a_failing_process_stops_the_other_at_once_with_one_line(launcher, tmp_path):
    """Process 1 alone fails: under torchrun it meets a damaged file (only its share of the data check
    reads it); started by hand (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, as Slurm or mp.spawn
    do) it raises at its second step. Process 0, waiting for it in a collective, stops within seconds
    (not at the process group's timeout of minutes) with one line naming it and no traceback; both exit
    non-zero."""
    root = _data_write_nyud_tree(tmp_path / 'data')  # train 0001 (process 0's to check), 0002 (process 1's)
    args = _train_nyud_args(root, tmp_path / 'run', '--max-iters', '3', '--eval-every', '3')
    if launcher == 'torchrun':
        damaged = os.path.join(root, 'images', '0002.png')
        _train_damage(damaged, 'truncated png')
        logs = tmp_path / 'logs'
        r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                            '--log-dir', str(logs), '--redirects', '3', 'train.py', *args],
                           cwd=HERE, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
        codes = re.findall(r'exitcode\s+: (-?\d+)', r.stderr)  # (torchrun's report; -15: it sent SIGTERM)
        assert r.returncode != 0 and len(codes) == 2 and '0' not in codes, r.stderr[-3000:]
        err = [next(logs.glob(f'*/attempt_0/{rank}/stderr.log')).read_text() for rank in (0, 1)]
        assert err[1].splitlines() == [f'train.py: error: {damaged}: cannot read it (OSError: image file is '
                                       "truncated); re-extract it or get the dataset as described in README.md, "
                                       "section 'Datasets'"], err[1]
        failed = err[1].splitlines()[0].removeprefix('train.py: error: ')
    else:
        script = tmp_path / 'raises.py'  # train.py whose process 1 raises at its second step
        script.write_text(textwrap.dedent(f'''\
            import os, sys
            sys.path.insert(0, {HERE!r})
            import train
            steps, step = [], train.train_step
            def train_step(run, batch):
                steps.append(batch)
                if os.environ['RANK'] == '1' and len(steps) == 2:
                    raise RuntimeError('a bug in process 1')
                return step(run, batch)
            train.train_step = train_step
            train.main(sys.argv[1:])'''))
        with socket.socket() as s:  # a free port for the launcher's key-value store
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        env = dict(ONE_THREAD, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), WORLD_SIZE='2')
        procs = [subprocess.Popen([sys.executable, str(script), *args], cwd=HERE, env=dict(env, RANK=str(rank)), text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for rank in (0, 1)]
        err = [None, procs[1].communicate(timeout=300)[1]]
        t1 = time.time()
        err[0] = procs[0].communicate(timeout=300)[1]
        assert time.time() - t1 < 10, err[0][-2000:]  # (it would wait 15 minutes in an all-reduce)
        assert [p.returncode for p in procs] == [1, 1] and 'RuntimeError: a bug in process 1' in err[1], err
        failed = 'RuntimeError: a bug in process 1'
    assert 'Traceback' not in err[0], err[0][-3000:]
    assert err[0].strip().splitlines()[-1] == f'train.py: error: rank 1 failed: {failed}; rank 0 stopped with it'
    assert err[0].count('train.py: error:') == 1


def test_train_resume_across_precisions(_train_run, tmp_path, monkeypatch):
    """An fp32 (or bf16) checkpoint has no GradScaler state; resuming it with --amp fp16 starts a fresh
    scale, and an fp16 checkpoint resumes without one. (fp16 autocast needs CUDA: here --amp fp16 is
    fp32 arithmetic with the GradScaler on, which is what the resume exercises.)"""
    pick = train.pick_precision
    monkeypatch.setattr(train, 'pick_precision', lambda amp, device: (None, True, 'test: fp32 with a GradScaler')
                        if amp == 'fp16' else pick(amp, device))
    train.main(['--resume', str(_train_run / 'run' / 'last.pt'), '--amp', 'fp16', '--max-iters', '7',
                '--eval-every', '7', '--out-dir', str(tmp_path / 'fp16')])
    ckpt = torch.load(tmp_path / 'fp16' / 'last.pt', weights_only=True)
    assert ckpt['step'] == 7 and ckpt['config']['amp'] == 'fp16' and ckpt['scaler']['scale'] > 0
    train.main(['--resume', str(tmp_path / 'fp16' / 'last.pt'), '--amp', 'off', '--max-iters', '8',
                '--eval-every', '8', '--out-dir', str(tmp_path / 'fp32')])
    ckpt = torch.load(tmp_path / 'fp32' / 'last.pt', weights_only=True)
    assert ckpt['step'] == 8 and ckpt['scaler'] == {}


def test_train_precision_follows_compute_capability(monkeypatch, capsys):
    """bf16 (and TF32) need compute capability 8.0 (Ampere): a V100 / T4 trains in fp16 with a GradScaler,
    even though torch.cuda.is_bf16_supported() says yes there (bf16 emulation). fp32 matmuls and
    convolutions run in TF32 under --amp tf32 alone (set through the fp32_precision API)."""
    gpu = torch.device('cuda:0')
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 0))  # V100
    with train.fp32_precision('ieee'):  # (the settings of the suite restored after)
        assert train.pick_precision('auto', gpu)[:2] == (torch.float16, True)
        assert train.pick_precision('off', gpu)[:2] == (None, False)
        for amp in ('bf16', 'tf32'):
            code, msg = _train_error_call(lambda: train.pick_precision(amp, gpu), capsys)
            assert code != 0 and f'does not support {amp}' in msg
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (8, 0))  # A100
        for amp, want, fp32 in (('auto', (torch.bfloat16, False), 'ieee'), ('fp16', (torch.float16, True), 'ieee'),
                                ('tf32', (None, False), 'tf32'), ('off', (None, False), 'ieee')):
            assert train.pick_precision(amp, gpu)[:2] == want, amp
            assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == (fp32,) * 2


def test_train_evaluation_is_fp32_whatever_the_training_precision(_train_run, tmp_path, monkeypatch):
    """--eval-only --amp bf16 and --amp off write the same scores, recorded as fp32: the evaluation runs
    without the autocast and the TF32 that a training around it would use (here both are on around the
    bf16 one), and leaves them as they were."""
    forward, seen = TaskExpert.forward_with_gates, []
    monkeypatch.setattr(TaskExpert, 'forward_with_gates', lambda model, x: seen.append(
        (torch.is_autocast_enabled('cpu'), torch.backends.cuda.matmul.fp32_precision,
         torch.backends.cudnn.conv.fp32_precision)) or forward(model, x))
    scores = {}
    for amp, fp32 in (('bf16', 'tf32'), ('off', 'ieee')):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp == 'bf16'), train.fp32_precision(fp32):
            train.main(['--eval-only', '--checkpoint', str(_train_run / 'run' / 'best.pt'), '--amp', amp,
                        '--out-dir', str(tmp_path / amp), '--eval-workers', '0'])
            assert torch.is_autocast_enabled('cpu') == (amp == 'bf16') and torch.backends.cuda.matmul.fp32_precision == fp32
        scores[amp] = json.loads(open(tmp_path / amp / 'metrics.jsonl').readline())
        assert scores[amp].pop('precision') == 'fp32' and scores[amp].pop('eval_only')
    assert scores['bf16'] == scores['off'] and set(seen) == {(False, 'ieee', 'ieee')}


def _train_step_gradients(batch, accum=1, clip=1e9):
    """One train_step of the tiny nyud model on `batch` -> (loss, per-task losses, the gradients the step
    applied, read as it starts: read back from the updated weights, they would be rounded to the weights'
    precision, 1.2e-7 for a LayerNorm weight of 1). The heads' BatchNorm is in eval mode: in train mode
    each micro-batch is normalised with its own statistics (as each process under DDP without
    SyncBatchNorm), which no accumulation can undo."""
    cpu = torch.device('cpu')
    model = _tiny(TASKS['nyud'], drop_path=0.0).train()
    for head in model.heads.values():
        head.bn.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    applied = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: applied.extend(
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()))
    run = train.Run({'accum_steps': accum, 'clip': clip}, model, model, optimizer,
                    torch.amp.GradScaler('cpu', enabled=False), MultiTaskLoss(model.tasks), cpu)
    total, per_task, skipped = train.train_step(run, batch)
    assert skipped is None
    return total, per_task, applied


def test_train_accumulated_micro_batches_equal_one_batch():
    """--accum-steps 2 on a batch of 4 gives the step of one batch of 4: same loss, same gradients.
    The targets have no void pixel, so that every micro-batch weighs its pixels alike."""
    batch = train.random_batch(TASKS['nyud'], 4, _MODEL_SIZE, torch.device('cpu'))
    (total1, tasks1, grads1), (total2, tasks2, grads2) = (_train_step_gradients(batch, accum) for accum in (1, 2))
    torch.testing.assert_close(total2, total1, rtol=1e-5, atol=0)
    for t in tasks1:
        torch.testing.assert_close(tasks2[t], tasks1[t], rtol=1e-5, atol=0)
    assert sum(g.abs().sum() for g in grads1) > 0
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-7)


def test_train_step_clips_the_gradient_norm_to_clip():
    """--clip c: a step whose gradients have a global norm above c applies them scaled to norm c, in
    the same direction; below c they are applied as they are."""
    batch = train.random_batch(TASKS['nyud'], 1, _MODEL_SIZE, torch.device('cpu'))
    free = _train_step_gradients(batch)[2]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in free])).item()
    clipped = _train_step_gradients(batch, clip=norm / 4)[2]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped])).item() == \
        pytest.approx(norm / 4, rel=1e-5)
    for g, f in zip(clipped, free):
        torch.testing.assert_close(g, f / 4, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('task, values, best_step', [('depth', (0.5, 0.3, 0.4), 2), ('semseg', (10.0, 30.0, 20.0), 2),
                                                     ('depth', (0.3, 0.5, 0.4), 1)])
def test_train_best_checkpoint_holds_the_best_main_metric_of_the_first_task(task, values, best_step, tmp_path):
    """best.pt and best.safetensors hold the evaluation with the best main metric of the run's first
    task: the lowest depth RMSE of a --tasks depth run, the highest semseg mIoU of another."""
    model = _tiny({task: TASKS['nyud'][task]})
    cfg = {'out_dir': str(tmp_path), 'dataset': 'nyud', 'tasks': [task]}
    optimizer = torch.optim.Adam(model.parameters())
    run = train.Run(cfg, model, model, optimizer, torch.amp.GradScaler('cpu', enabled=False),
                    MultiTaskLoss(model.tasks), torch.device('cpu'))
    key = TASK_TABLE[task].metric
    for step, value in enumerate(values, 1):
        train.keep_best(run, step, {task: {key: value}}, [train.rng_state()])
    best = torch.load(tmp_path / 'best.pt', weights_only=True)
    want = {'metric': f'{task} {key}', 'value': values[best_step - 1], 'step': best_step}
    assert best['best'] == want and best['step'] == best_step and run.best == want
    assert read_checkpoint(str(tmp_path / 'best.safetensors'))['step'] == best_step


def test_train_best_checkpoint_of_a_multi_task_run_follows_its_first_task(tmp_path):
    """A semseg + depth run keeps as best the evaluation of the highest semseg mIoU, whatever depth does
    (here its RMSE is lowest at another step)."""
    model = _tiny({'semseg': 40, 'depth': 1})
    run = train.Run({'out_dir': str(tmp_path), 'dataset': 'nyud', 'tasks': ['semseg', 'depth']}, model, model,
                    torch.optim.Adam(model.parameters()), torch.amp.GradScaler('cpu', enabled=False),
                    MultiTaskLoss(model.tasks), torch.device('cpu'))
    for step, (miou, rmse) in enumerate(((30.0, 0.5), (10.0, 0.4), (20.0, 0.2)), 1):
        train.keep_best(run, step, {'semseg': {'mIoU': miou}, 'depth': {'rmse': rmse}}, [train.rng_state()])
    assert run.best == {'metric': 'semseg mIoU', 'value': 30.0, 'step': 1}
    assert torch.load(tmp_path / 'best.pt', weights_only=True)['best'] == run.best


def test_train_learning_rate_schedule_at_known_steps():
    """Poly decay (1 - step / max_iters)^0.9 per iteration, times a linear warm-up when there is one."""
    cfg = {'lr': 1e-3, 'max_iters': 100, 'warmup': 0}
    assert [train.lr_at(s, cfg) for s in (0, 50, 99)] == pytest.approx([1e-3, 1e-3 * 0.5 ** 0.9, 1e-3 * 0.01 ** 0.9])
    cfg['warmup'] = 10
    assert [train.lr_at(s, cfg) for s in (0, 4, 9, 50)] == pytest.approx(
        [1e-4, 5e-4 * 0.96 ** 0.9, 1e-3 * 0.91 ** 0.9, 1e-3 * 0.5 ** 0.9])  # x (step + 1) / 10 for 10 steps


def test_train_warmup_weight_decay_and_loss_settings_reach_what_they_set(tmp_path):
    """The flags of a fresh run, resolved as train.py resolves them, reach what uses them: the warm-up
    the schedule (hand values), the weight decay and lr Adam's groups, the loss weights and the edge
    positive weight the loss."""
    args = _train_tiny_args(tmp_path / 'data', tmp_path / 'run', '--weight-decay', '0.01', '--warmup', '4',
                            '--max-iters', '10', '--edge-pos-weight', '0.8', '--loss-weights', 'depth=3')
    cfg = train.resolve_config(train.parse_args(args))
    assert [train.lr_at(s, cfg) for s in (0, 3, 4)] == pytest.approx([1e-3 / 4, 1e-3 * 0.7 ** 0.9, 1e-3 * 0.6 ** 0.9])
    run = train.build(cfg, device=torch.device('cpu'), world=1, rank=0, amp_dtype=None, use_scaler=False)
    assert [(g['weight_decay'], g['lr']) for g in run.optimizer.param_groups] == [(0.01, 1e-3)]
    assert run.loss_fn.weights == {'semseg': 1.0, 'depth': 3.0, 'normals': 10.0, 'edge': 50.0}
    assert run.loss_fn.pos_weights == {'semseg': None, 'depth': None, 'normals': None, 'edge': 0.8}


def _train_other_value(action, old, tmp_path):
    """A value of a setting's flag (its argparse action) other than `old`, by the flag's kind -> (the
    words to pass, the value config.json must then hold). A flag of a new kind stops the test here."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if not old else '--no-' + flag[2:]], not old
    if action.choices:
        new = next(c for c in action.choices if c != old)
        return [flag, new], new
    if action.type is train.task_weight:  # one task's weight changed, the others kept
        task = next(iter(old))
        return [flag, f'{task}={old[task] + 1}'], {**old, task: old[task] + 1}
    if action.nargs in ('+', '*', 2):
        new = ([v + 1 for v in old] if action.type is int else old[:1] if len(old) > 1 else [str(tmp_path / 'x')])
        return [flag, *map(str, new)], new
    kinds = {int: lambda: (old or 0) + 1, float: lambda: old / 2 if old else 0.5, None: lambda: str(tmp_path / 'x')}
    new = kinds[action.type]()
    return [flag, str(new)], new


def test_train_flags_win_over_the_checkpoint_on_resume_and_model_settings_are_refused(_train_run, tmp_path,
                                                                                         monkeypatch, capsys):
    """--resume with each setting's flag, found in the parser (a new flag is covered too), set to another
    value than the checkpoint's: a training setting takes the flag's value and nothing else changes; a
    model setting (MODEL_KEYS: those the model is built from) is refused in one line naming the flag.
    The resumed Adam keeps its moments but takes the run's weight decay, not the checkpoint's."""
    last = str(_train_run / 'run' / 'last.pt')
    ckpt = read_checkpoint(last)
    saved = ckpt['config']
    actions = [a for a in train.make_parser()._actions if a.dest in train.SETTINGS]
    assert sorted(a.dest for a in actions) == sorted(train.SETTINGS)  # every setting has a flag
    # the model settings: every one the model is built from, but activation checkpointing, which only
    # recomputes (test_model_grad_checkpoint_gives_the_same_step)
    read = set()

    class Recorded(dict):
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)
    with torch.device('meta'):
        TaskExpert.from_config(Recorded(saved))
    assert set(train.MODEL_KEYS) == read - {'grad_checkpoint'} and 'grad_checkpoint' in read
    for action in actions:
        words, value = _train_other_value(action, saved[action.dest], tmp_path)
        resolve = functools.partial(train.resolve_config, train.parse_args(['--resume', last, *words]), saved)
        if action.dest in train.MODEL_KEYS:
            code, msg = _train_error_call(resolve, capsys)
            assert msg.startswith(f'train.py: error: {words[0]} ') and msg.endswith(
                'model settings cannot change when loading a checkpoint'), msg
            continue
        cfg = resolve()
        assert cfg[action.dest] == value, (words, cfg[action.dest])
        assert {k: v for k, v in cfg.items() if k != action.dest} == {k: v for k, v in saved.items() if
                                                                        k != action.dest}, words
    resolved = []  # the whole command: its run gets the flag's weight decay
    monkeypatch.setattr(train, 'run_mode', lambda args, cfg, *rest: resolved.append(cfg))
    train.main(['--resume', last, '--weight-decay', '0.25'])
    run = train.build(resolved[0], device=torch.device('cpu'), world=1, rank=0, amp_dtype=None, use_scaler=False,
                      resume=(last, ckpt))
    assert [g['weight_decay'] for g in run.optimizer.param_groups] == [0.25]
    assert torch.equal(run.optimizer.state_dict()['state'][0]['exp_avg'], ckpt['optimizer']['state'][0]['exp_avg'])


def test_train_startup_warnings(monkeypatch):
    monkeypatch.setattr(os, 'cpu_count', lambda: 8)
    cfg = train.resolve_config(train.parse_args([]))  # synthetic: batch 8, 1 data worker
    cpu, gpu = torch.device('cpu'), torch.device('cuda:0')
    assert train.startup_warnings(cfg, cpu, 1) == []
    assert train.startup_warnings({**cfg, 'batch_size': 4}, gpu, 4) == []  # SyncBatchNorm over 4 images
    one = train.startup_warnings({**cfg, 'batch_size': 4, 'accum_steps': 4}, gpu, 1)
    assert len(one) == 1 and 'BatchNorm normalises each image with its own statistics' in one[0]
    gloo = train.startup_warnings({**cfg, 'batch_size': 2}, cpu, 2)
    assert len(gloo) == 2 and 'own statistics' in gloo[0] and 'gloo' in gloo[1]
    many = train.startup_warnings({**cfg, 'workers': 4}, gpu, 4)
    assert len(many) == 1 and '4 process(es) x --workers 4 data loaders on 8 CPU cores' in many[0]


@pytest.mark.slow
def test_train_compiled_regions_equal_eager():
    """--compile: torch.compile (inductor, as --compile runs it) of each block and MMoE (compile_regions),
    with activation checkpointing around and inside them, gives the loss and gradients of the eager
    model. Building the kernels takes minutes on a CPU: run with `pytest -m slow`."""
    batch = train.random_batch(TASKS['nyud'], 2, _MODEL_SIZE, torch.device('cpu'))
    results = []
    for compiled in (False, True):
        model = _tiny(TASKS['nyud'], taps=(1, 2), num_experts=2, grad_checkpoint='all' if compiled else 'off').train()
        if compiled:
            train.compile_regions(model)
        total, _ = MultiTaskLoss(model.tasks)(model(batch['image']), batch)
        total.backward()
        results.append((total, [p.grad for p in model.parameters() if p.requires_grad]))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)
    for g_comp, g_eager in zip(comp_grads, eager_grads):
        torch.testing.assert_close(g_comp, g_eager, rtol=1e-3, atol=1e-5)


@pytest.mark.heavy
def test_train_compile_flag_trains_as_eager_and_saves_plain_keys(_train_run, tmp_path, monkeypatch):
    """--compile in the training loop, with --accum-steps and --grad-checkpoint: the blocks and MMoEs are
    compiled, the heads not; its losses are the eager run's, and its checkpoints hold the model's own keys.
    The aot_eager backend stands in for inductor, whose kernels take minutes to build on a CPU
    (test_train_compiled_regions_equal_eager); fullgraph: no graph break inside a region."""
    compile, compiled = torch.compile, []
    monkeypatch.setattr(torch, 'compile', lambda f: compiled.append(f.__self__) or compile(
        f, backend='aot_eager', fullgraph=True))
    runs = {}
    for flag in ('--no-compile', '--compile'):
        runs[flag] = tmp_path / flag
        train.main(_train_tiny_args(_train_run / 'data', runs[flag], '--max-iters', '3', '--eval-every', '3',
                                    '--batch-size', '4', '--accum-steps', '2', '--grad-checkpoint', 'mmoe',
                                    '--taps', '1', '2', flag))
    ckpt = torch.load(runs['--compile'] / 'last.pt', weights_only=True)
    model = TaskExpert.from_config(ckpt['config'])
    assert [type(m) for m in compiled] == [type(m) for m in [*model.backbone.blocks, *model.mmoe]]
    assert ckpt['step'] == 3 and set(ckpt['model']) == set(model.state_dict())
    for eager, comp in zip(*(_train_losses(runs[flag]) for flag in runs), strict=True):
        assert comp == pytest.approx({**eager, 'img_s': comp['img_s']}, rel=1e-4)


@pytest.mark.heavy
def test_train_torchrun_sharded_eval_equals_one_process(_train_run, tmp_path):
    # 3 val rooms over 2 processes (1 + 2): each image scored once, sums all-reduced
    args = ['--eval-only', '--checkpoint', str(_train_run / 'run' / 'best.pt'), '--data-root', str(tmp_path / 'data'),
            '--scenes', '2', '3', '--workers', '0', '--eval-workers', '0']
    train.main(args + ['--out-dir', str(tmp_path / 'one'), '--batch-size', '1'])  # the same model batches as:
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train.py', *args, '--out-dir', str(tmp_path / 'two'), '--batch-size', '2',
                        '--save-predictions'], cwd=HERE, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('eval at step') == 1  # rank 0 alone reports
    val_ids = data.NYUD(str(tmp_path / 'data'), 'val', train=False).ids
    step = read_checkpoint(str(_train_run / 'run' / 'best.pt'))['step']  # (the best evaluation's: 3 or 6)
    assert sorted(os.listdir(tmp_path / 'two' / f'val_step{step}' / 'edge')) == [f'{i}.png' for i in val_ids]  # both shares
    one, two = (json.loads(open(tmp_path / d / 'metrics.jsonl').readline()) for d in ('one', 'two'))
    assert one['edge'] == two['edge']  # integer counts: exactly
    for t in ('semseg', 'depth', 'normals'):  # float sums, added in another order
        assert two[t] == _metrics_approx(one[t], rel=1e-9), t
    assert two['gate_memory']['block6'] == pytest.approx(one['gate_memory']['block6'], rel=1e-6)


def test_train_interrupted_checkpoint_write_keeps_the_previous(_train_run, tmp_path, monkeypatch):
    path = tmp_path / 'last.pt'
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    state = dict(model=model, optimizer=opt, scaler=scaler, rng=[train.rng_state()], config={'dataset': 'nyud'})
    save_checkpoint(str(path), step=1, **state)

    def torn_save(obj, f):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', torn_save)
    with pytest.raises(OSError):
        save_checkpoint(str(path), step=2, **state)
    assert os.listdir(tmp_path) == ['last.pt']  # no temporary file left behind
    assert read_checkpoint(str(path))['step'] == 1


def test_train_non_finite_loss_is_skipped_then_stops(_train_run, tmp_path, monkeypatch, capsys):
    class NanDepth(train.MultiTaskLoss):
        def forward(self, outputs, batch):
            total, per_task = super().forward(outputs, batch)
            per_task['depth'] = per_task['depth'] * float('nan')
            return total + per_task['depth'], per_task

    monkeypatch.setattr(train, 'MultiTaskLoss', NanDepth)
    code, msg = _train_error(['--resume', str(_train_run / 'run' / 'last.pt'), '--max-iters', '20',
                              '--eval-every', '20', '--out-dir', str(tmp_path)], capsys)
    out = capsys.readouterr().out
    assert 'step 7: non-finite loss in depth: step skipped (1 in a row)' in out, out
    assert code != 0 and '5 non-finite steps in a row at step 11' in msg and '\n' not in msg
    assert not (tmp_path / 'last.pt').exists()  # stopped before the next checkpoint


def _train_error(argv, capsys):
    return _train_error_call(lambda: train.main(argv), capsys)


def _train_error_call(fn, capsys):
    with pytest.raises(SystemExit) as e:
        fn()
    msg = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err.strip()
    return e.value.code, msg


@pytest.mark.parametrize('argv, expected', [
    (['--img-size', '100', '96'], '--img-size 100 96'),
    (['--resume', 'no/such/last.pt'], '--resume: no checkpoint at no/such/last.pt: pass --resume RUN/last.pt'),
    (['--resume'], f'--resume: no checkpoint at {os.path.join("{tmp_path}", "out", "last.pt")}'),
    (['--batch-size', '0'], '--batch-size 0'),
    (['--taps', '6', '3'], '--taps 6 3'),
    (['--amp', 'fp16', '--device', 'cpu', '--benchmark'], 'fp16 needs a CUDA'),
    (['--lr'], 'expected one argument'),
    (['--no-such-flag'], 'unrecognized arguments'),
    (['--loss-weights', 'sal=2'], '--loss-weights sal=2.0: needs a task of this synthetic run'),
    (['--tasks', 'depth', 'sal'], '--tasks sal: synthetic has no task sal; its tasks are semseg, depth, normals, edge'),
    (['--tasks', 'depth', '--loss-weights', 'edge=2'],
     '--loss-weights edge=2.0: needs a task of this synthetic run (depth)'),
    (['--loss-weights', 'depth=x'], "'depth=x' is not TASK=WEIGHT"),
    (['--loss-weights', 'depth=nan'], '--loss-weights depth=nan'),
    (['--lr', 'nan'], '--lr nan'),
    (['--lr', 'inf'], '--lr inf'),
    (['--clip', 'nan'], '--clip nan'),
    (['--seed', '-1'], '--seed -1'),
    (['--seed', str(2 ** 64)], f'--seed {2 ** 64}: must be in 0 .. 2^63 - 1'),
    (['--edge-pos-weight', '1'], '--edge-pos-weight 1.0: must be between 0 and 1'),
    (['--batch-size', '6', '--accum-steps', '4'], '--batch-size 6 must split evenly into 1 process(es) x --accum-steps 4'),
    (['--accum-steps', '0'], '--accum-steps 0: must be at least 1'),
    (['--flops-only'], '--flops-only applies to --benchmark only'),
    (['--baselines', 'no/such/run'], '--baselines no/such/run: not a folder of train.py'),
    (['--predict', 'photos', '--save-predictions'], '--save-predictions applies to training and --eval-only'),
])
def test_train_bad_flags_give_one_line_errors(argv, expected, tmp_path, capsys):
    code, msg = _train_error(argv + ['--out-dir', str(tmp_path / 'out'), '--data-root', str(tmp_path / 'data')], capsys)
    assert code != 0 and expected.format(tmp_path=tmp_path) in msg and '\n' not in msg, msg
    assert not (tmp_path / 'out').exists()  # nothing written


def _train_nyud_args(data_root, out_dir, *extra):
    """A tiny run on a NYUD-layout fixture at 16x16: one step, evaluated at once."""
    return ['--dataset', 'nyud', '--data-root', str(data_root), '--out-dir', str(out_dir), '--img-size', '16', '16',
            '--backbone', 'tiny', '--taps', '6', '12', '--num-experts', '2', '--expert-dim', '16',
            '--batch-size', '2', '--max-iters', '1', '--eval-every', '1', '--workers', '0', '--pretrained', 'none',
            *extra]


def _train_damage(path, kind):
    """Damage one data file of a NYUD-layout fixture as a download, a disk or a user's own export might."""
    h, w = _DATA_H, _DATA_W
    if kind == 'truncated png':
        blob = open(path, 'rb').read()
        open(path, 'wb').write(blob[:len(blob) // 2])
    elif kind == 'zero-byte npy':
        open(path, 'wb').close()
    elif kind in ('label 41', 'labels 0..39, 255 void'):
        Image.fromarray(np.full((h, w), 41 if kind == 'label 41' else 255, np.uint8)).save(path)
    elif kind == 'wrong-size normals':  # one row taller than its image
        Image.fromarray(np.full((h + 1, w, 3), 128, np.uint8)).save(path)
    elif kind == 'colour labels':  # a visualisation saved in place of the class indices
        Image.fromarray(np.full((h, w, 3), 7, np.uint8)).save(path)
    elif kind == 'depth (h, w, 3)':
        np.save(path, np.ones((h, w, 3), np.float32))
    elif kind == 'npz named npy':
        with open(path, 'wb') as f:
            np.savez(f, depth=np.ones((h, w), np.float32))
    elif kind == 'millimetres':  # the Kinect's raw uint16
        np.save(path, np.full((h, w), 2500, np.uint16))
    elif kind == 'millimetres as floats':
        np.save(path, np.full((h, w), 2500.0, np.float32))
    elif kind == 'edges 0 / 1':
        Image.fromarray(np.eye(h, w, dtype=np.uint8)).save(path)
    elif kind == '16-bit image':
        Image.fromarray(np.full((h, w), 40000, np.uint16)).save(path)
    else:  # greyscale normals
        Image.fromarray(np.full((h, w), 128, np.uint8)).save(path)


@pytest.mark.parametrize('kind, file, split, workers', [
    (kind, file, split, workers) for kind, file in (('truncated png', 'images/{}.png'), ('zero-byte npy', 'depth/{}.npy'),
                                                    ('label 41', 'segmentation/{}.png'),
                                                    ('wrong-size normals', 'normals/{}.png'))
    for split, workers in (('train', '0'), ('val', '1'))] + [  # val: read in a worker process
    # files in formats a reader would half-understand, which used to train and then crash or score wrongly
    (kind, file, 'val', '0') for kind, file in (
        ('colour labels', 'segmentation/{}.png'), ('labels 0..39, 255 void', 'segmentation/{}.png'),
        ('depth (h, w, 3)', 'depth/{}.npy'), ('npz named npy', 'depth/{}.npy'), ('millimetres', 'depth/{}.npy'),
        ('millimetres as floats', 'depth/{}.npy'),
        ('edges 0 / 1', 'edge/{}.png'), ('16-bit image', 'images/{}.png'), ('greyscale normals', 'normals/{}.png'))])
def test_train_damaged_data_file_stops_before_step_1(kind, file, split, workers, tmp_path, capsys):
    root = _data_write_nyud_tree(tmp_path / 'data')
    path = os.path.join(root, file.format('0001' if split == 'train' else '0003'))
    _train_damage(path, kind)
    code, msg = _train_error(_train_nyud_args(root, tmp_path / 'run', '--workers', workers), capsys)
    assert code != 0 and path in msg and '\n' not in msg, msg
    assert 'step 1' not in capsys.readouterr().out and not (tmp_path / 'run').exists()


def test_train_img_size_smaller_than_the_data_stops_at_start(tmp_path, capsys):
    root = _data_write_nyud_tree(tmp_path / 'data', size=(20, 24))  # larger than --img-size 16 16
    code, msg = _train_error(_train_nyud_args(root, tmp_path / 'runs' / 'nyud'), capsys)
    assert code != 0 and '--img-size 32 32' in msg and '0003.png' in msg and '\n' not in msg, msg
    assert 'step 1' not in capsys.readouterr().out and not (tmp_path / 'runs').exists()  # nor the folder above


@pytest.mark.parametrize('kill', ['evaluation', 'second save'])
def test_train_kill_after_the_first_save_loses_nothing(kill, _train_run, tmp_path, monkeypatch):
    """Killed at step 3 during the evaluation, or while writing the second checkpoint file: nothing on
    disk names best weights that were never saved, and the resumed run ends as an uninterrupted one."""
    run, calls = tmp_path / 'run', []
    target = 'report' if kill == 'evaluation' else 'save_checkpoint'
    original = getattr(train, target)

    def dies(*a, **k):
        calls.append(a)
        if len(calls) == (1 if kill == 'evaluation' else 2):
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(train, target, dies)
    with pytest.raises(SystemExit, match='interrupted'):
        train.main(_train_tiny_args(_train_run / 'data', run, '--max-iters', '6', '--eval-every', '3'))
    monkeypatch.setattr(train, target, original)
    for name in ('last.pt', 'best.pt'):
        best = torch.load(run / name, weights_only=True)['best'] if (run / name).exists() else None
        assert best is None or ((run / 'best.pt').exists() and
                                torch.load(run / 'best.pt', weights_only=True)['step'] == best['step']), name
    # (the viewer reads a folder's event files in name order, which starts with the second they were made:
    # a resume in the same second of the same process could sort before the killed run's file)
    time.sleep(1 - time.time() % 1)
    train.main(['--resume', str(run / 'last.pt')])
    mine, full = (torch.load(r / 'best.pt', weights_only=True) for r in (run, _train_run / 'run'))
    assert mine['best'] == full['best'] and mine['step'] == mine['best']['step']
    assert read_checkpoint(str(run / 'best.safetensors'))['step'] == mine['step']
    assert [r['loss'] for r in _train_losses(run)] == [r['loss'] for r in _train_losses(_train_run / 'run')]
    evals = [json.loads(line) for line in open(run / 'metrics.jsonl')]
    assert [e['step'] for e in evals if 'semseg' in e] == [3, 6]
    # TensorBoard: what the killed run wrote after its checkpoint is dropped: each step once
    board = _train_board(run)
    assert _board_steps(board, 'train/loss') == list(range(1, 7)) and _board_steps(board, 'semseg/mIoU') == [3, 6]
    assert [e.value for e in board.Scalars('train/loss')] == pytest.approx([r['loss'] for r in _train_losses(run)])


def test_train_resume_drops_a_torn_last_log_line(_train_run, tmp_path, capsys):
    run = tmp_path / 'run'
    shutil.copytree(_train_run / 'run', run)
    for name in ('train.jsonl', 'metrics.jsonl'):  # the last line cut by a kill or a full disk
        with open(run / name, 'a') as f:
            f.write('{"step": 7, "loss": 0.12')
    (run / '.last.pt.tmp4242').write_bytes(b'PK half a checkpoint')  # left by a killed checkpoint write
    train.main(['--resume', str(run / 'last.pt'), '--max-iters', '7'])
    out = capsys.readouterr().out
    assert 'train.jsonl line 7' in out and 'metrics.jsonl line 4' in out, out
    assert [r['step'] for r in _train_losses(run)] == list(range(1, 8))
    evals = [json.loads(line) for line in open(run / 'metrics.jsonl')]
    assert [e['step'] for e in evals if 'semseg' in e] == [3, 6, 7]
    assert not (run / '.last.pt.tmp4242').exists()


def test_train_non_finite_model_at_an_evaluation_step(_train_run, tmp_path, monkeypatch, capsys):
    build, forwards = TaskExpert.from_config, []

    def diverging(config):  # the weights turn NaN during step 3, an evaluation step
        model = build(config)

        def poison(module, inputs):
            forwards.append(module.training)
            if forwards.count(True) == 3:
                with torch.no_grad():
                    next(module.parameters()).fill_(float('nan'))
        model.register_forward_pre_hook(poison)
        return model

    monkeypatch.setattr(TaskExpert, 'from_config', diverging)
    run = tmp_path / 'run'
    code, msg = _train_error(_train_tiny_args(_train_run / 'data', run, '--max-iters', '20', '--eval-every', '3'),
                             capsys)
    out = capsys.readouterr().out
    assert code != 0 and '5 non-finite steps in a row at step 7' in msg and '\n' not in msg, msg
    assert 'step 3: the last 1 step(s) were non-finite: evaluation skipped' in out, out
    assert not (run / 'last.pt').exists()  # NaN weights never replace a checkpoint
    assert not (run / 'metrics.jsonl').exists()  # nothing evaluated


def test_train_one_run_per_out_dir(_train_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / 'run'
    args = _train_tiny_args(_train_run / 'data', run, '--max-iters', '6', '--eval-every', '3')
    save, refusals, busy = train.save_checkpoint, [], []

    def save_while_another_starts(path, *a, **k):  # a second fresh run, then a --resume of this one
        if path.endswith('last.pt') and not busy:
            busy.append(path)
            refusals.append(_train_error(['--resume', path] if os.path.exists(path) else args, capsys))
            busy.pop()
        save(path, *a, **k)

    monkeypatch.setattr(train, 'save_checkpoint', save_while_another_starts)
    train.main(args)
    monkeypatch.setattr(train, 'save_checkpoint', save)
    assert len(refusals) == 2
    for code, msg in refusals:
        assert code != 0 and 'in use by another run' in msg and f'pid {os.getpid()}' in msg and '\n' not in msg, msg
    assert [r['step'] for r in _train_losses(run)] == list(range(1, 7))  # one run's lines, once each
    assert not (run / 'train.lock').exists()
    (run / 'train.lock').write_text('pid 999999 on a-crashed-host\n')  # left by a killed run: stale
    train.main(['--resume', str(run / 'last.pt'), '--max-iters', '7'])
    assert 'stale' in capsys.readouterr().out and not (run / 'train.lock').exists()


def test_train_bad_checkpoints_give_one_line_errors(_train_run, tmp_path, capsys):
    junk = tmp_path / 'vit.pth'
    junk.write_bytes(b'\x80\x02 not a checkpoint')
    code, msg = _train_error(_train_tiny_args(_train_run / 'data', tmp_path / 'a', '--pretrained', str(junk)), capsys)
    assert code != 0 and str(junk) in msg and '\n' not in msg, msg
    ckpt = torch.load(_train_run / 'run' / 'last.pt', weights_only=True)
    ckpt['config']['expert_dim'] = 16  # edited by hand: the weights no longer fit
    torch.save(ckpt, tmp_path / 'edited.pt')
    for argv in (['--eval-only', '--checkpoint', str(tmp_path / 'edited.pt')], ['--resume', str(tmp_path / 'edited.pt')]):
        code, msg = _train_error(argv, capsys)
        assert code != 0 and 'edited.pt' in msg and 'do not fit' in msg and '\n' not in msg, msg
    del ckpt['format']  # a checkpoint of train.py before the final LayerNorm fed the last MMoE
    ckpt['config']['expert_dim'] = 32
    torch.save(ckpt, tmp_path / 'old.pt')
    for argv in (['--eval-only', '--checkpoint', str(tmp_path / 'old.pt')], ['--resume', str(tmp_path / 'old.pt')]):
        code, msg = _train_error(argv, capsys)
        assert code != 0 and 'old.pt: written by an older train.py' in msg and '\n' not in msg, msg


def _run_with_file_size_limit(argv, limit_bytes, cwd):
    """Run a command (argv, e.g. [sys.executable, 'train.py', ...]) in cwd with files limited to
    limit_bytes (RLIMIT_FSIZE, set in the child only), as a full disk would stop it: the kernel fails
    the write that passes the limit (EFBIG, with SIGXFSZ ignored, else it would kill the child), and
    each writer raises whatever it really raises then -> subprocess.CompletedProcess (text output)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run(argv, cwd=cwd, env=ONE_THREAD, capture_output=True, text=True, preexec_fn=limit, timeout=600)


@pytest.mark.heavy
def test_train_full_disk_is_one_line_and_keeps_the_last_checkpoint(_train_run, tmp_path):
    """A checkpoint that cannot be written (torch.save raises RuntimeError, not OSError, for a failed
    write): one line naming it, exit 1, the previous last.pt intact and no temporary file left."""
    run = tmp_path / 'run'
    shutil.copytree(_train_run / 'run', run)
    before = (run / 'last.pt').read_bytes()
    r = _run_with_file_size_limit([sys.executable, 'train.py', '--resume', str(run / 'last.pt'), '--max-iters', '9',
                                   '--eval-every', '3'], 2 ** 20, HERE)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert re.fullmatch(rf'train.py: error: {run}/last.pt: cannot write it, the disk may be full \(.*\); free some '
                        'space or pass another --out-dir', r.stderr.strip().splitlines()[-1]), r.stderr
    assert (run / 'last.pt').read_bytes() == before and not [n for n in os.listdir(run) if '.tmp' in n]


def _tree(folder):
    """Every file under folder -> its bytes: what a command must leave byte-identical."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(pathlib.Path(folder).rglob('*')) if p.is_file()}


def _png_header(path, h, w):
    """A PNG file that declares h x w RGB pixels and holds none: what PIL reads of a photo at open."""
    chunk = lambda kind, body: (struct.pack('>I', len(body)) + kind + body +  # noqa: E731
                                struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) + chunk(b'IEND', b''))


@pytest.mark.heavy
def test_train_predict_leaves_the_photos_alone_and_gives_each_its_own_files(_train_run, tmp_path, capsys):
    photos, ckpt = tmp_path / 'photos', str(_train_run / 'run' / 'best.safetensors')
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ('b.jpg', 'b.png'):  # one name, two images
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(photos / name)
    before = _tree(photos)
    for out in (photos, photos / '.'):  # the photos' own folder, by any name: refused
        code, msg = _train_error(['--predict', str(photos), '--checkpoint', ckpt, '--out-dir', str(out)], capsys)
        assert code != 0 and 'holds the images of --predict' in msg and '\n' not in msg, msg
    train.main(['--predict', str(photos), '--checkpoint', ckpt, '--out-dir', str(tmp_path / 'out')])
    assert sorted(os.listdir(tmp_path / 'out')) == ['b.jpg.npz', 'b.jpg.png', 'b.png.npz', 'b.png.png']
    assert _tree(photos) == before
    assert np.load(tmp_path / 'out' / 'b.jpg.npz')['semseg'].dtype == np.uint8  # class ids, not scores
    _png_header(photos / 'huge.png', 13500, 13500)  # 182 megapixels: PIL's decompression-bomb limit
    code, msg = _train_error(['--predict', str(photos / 'huge.png'), '--checkpoint', ckpt, '--out-dir',
                              str(tmp_path / 'out')], capsys)
    assert code != 0 and 'huge.png: cannot read the image' in msg and 'decompression bomb' in msg and '\n' not in msg


def test_train_never_writes_into_another_runs_or_a_users_folder(_train_run, tmp_path, capsys):
    """--resume into a folder holding another run, and any run into a folder of other files, are refused
    as a fresh run into a run's folder is; the files there stay byte-identical."""
    other, mine = tmp_path / 'other', tmp_path / 'mine'
    shutil.copytree(_train_run / 'run', other)
    mine.mkdir()
    (mine / 'config.json').write_text('{"my": "settings"}')
    trees = {d: _tree(d) for d in (other, mine)}
    resume = ['--resume', str(_train_run / 'run' / 'last.pt')]
    for argv, refusal in ((resume + ['--out-dir', str(other)], f'{other} already holds a run (last.pt, best.pt, '),
                          (resume + ['--out-dir', str(mine)], f'{mine} holds files that train.py did not write'),
                          (_train_tiny_args(_train_run / 'data', mine), 'did not write (config.json)')):
        code, msg = _train_error(argv, capsys)
        assert code != 0 and refusal in msg and '\n' not in msg, msg
    assert {d: _tree(d) for d in trees} == trees


def test_train_data_root_of_other_files_or_another_dataset_is_refused(tmp_path, capsys):
    """The synthetic scenes are written only into a new or empty folder or one of their own; a folder
    of another dataset's layout names it. Nothing there changes."""
    mine = tmp_path / 'mine'
    (mine / 'images').mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(mine / 'images' / '0000.png')
    pascal = _data_write_pascal_tree(tmp_path / 'pascal')
    nyud = _data_write_nyud_tree(tmp_path / 'nyud')
    trees = {d: _tree(d) for d in (mine, pascal, nyud)}
    for argv, refusal in ((['--data-root', str(mine)], 'holds files that make_synthetic did not write (images)'),
                          (['--data-root', pascal], 'holds PASCAL-Context, not --dataset synthetic'),
                          (['--dataset', 'nyud', '--data-root', pascal], '--dataset pascal, or another --data-root'),
                          (['--dataset', 'pascal', '--data-root', nyud], 'holds NYUD-v2, not --dataset pascal'),
                          (['--data-root', nyud], 'pass --dataset nyud')):
        code, msg = _train_error(argv + ['--pretrained', 'none', '--out-dir', str(tmp_path / 'run')], capsys)
        assert code != 0 and refusal in msg and '\n' not in msg, msg
    assert {d: _tree(d) for d in trees} == trees and not (tmp_path / 'run').exists()


def _descendants(pid):
    """The pids of a process's children, theirs, ... (Linux /proc)."""
    kids = []
    for task in os.listdir(f'/proc/{pid}/task'):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in open(f'/proc/{pid}/task/{task}/children').read().split()]
    return kids + [d for k in kids for d in _descendants(k)]


def _running(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rpartition(')')[2].split()[0] not in 'ZX'
    except OSError:
        return False


def _still_running(pids, seconds=20):
    """The pids still running after up to `seconds` (a data loader worker checks its parent every 5 s)."""
    deadline = time.time() + seconds
    while any(map(_running, pids)) and time.time() < deadline:
        time.sleep(0.2)
    return [p for p in pids if _running(p)]


def _train_until_it_evaluates(_train_run, run, *extra):
    """A tiny train.py run with two boundary workers, started and read until its first checkpoint is
    saved (its evaluation starts) -> (the process, its output so far, the pids of its descendants)."""
    args = _train_tiny_args(_train_run / 'data', run, '--max-iters', '600', '--eval-every', '2', '--eval-workers', '2',
                            *extra)
    p = subprocess.Popen([sys.executable, 'train.py', *args], cwd=HERE, env=ONE_THREAD, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = ''
    while 'saved' not in out:
        line = p.stdout.readline()
        assert line, out[-3000:]  # (it ended before)
        out += line
    return p, out, _descendants(p.pid)


@pytest.mark.heavy
@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='reads the process tree from Linux /proc')
def test_train_sigterm_says_what_was_saved_and_leaves_no_process(_train_run, tmp_path):
    """SIGTERM (or Ctrl-C) during an evaluation: one line saying what was saved and how to resume, no
    traceback, and no boundary worker or resource tracker left behind."""
    p, out, children = _train_until_it_evaluates(_train_run, tmp_path / 'run')
    assert len(children) >= 3, children  # two boundary workers and multiprocessing's resource tracker
    p.send_signal(signal.SIGTERM)
    out += p.stdout.read()
    assert p.wait(timeout=60) == 1 and 'Traceback' not in out, out[-3000:]
    last = str(tmp_path / 'run' / 'last.pt')
    assert out.strip().splitlines()[-1] == (f'train.py: error: interrupted; {last} holds step 2: continue with '
                                            f'--resume {last}'), out[-2000:]
    assert not _still_running(children)
    assert not (tmp_path / 'run' / 'train.lock').exists()


# ---- nothing lost, second round: a run folder is its run's, photos as shown, no process left behind ---

def _sha256s(folder):
    """Every file under folder -> its SHA-256: what a command must leave as it was."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pathlib.Path(folder).rglob('*')) if p.is_file()}


@pytest.mark.heavy
def test_train_a_run_folder_is_its_runs(_train_run, tmp_path, monkeypatch, capsys):
    """Any file a run wrote marks its folder: a new run into a folder that kept only its
    best.safetensors and logs, --eval-only of another run's checkpoint into it, and --resume of its
    best.pt while a later last.pt exists are each refused in one line naming what is there, every file
    byte-identical; --rewind resumes it anyway and keeps what it replaces. --eval-only writes again
    into a folder of its own earlier outputs."""
    run, data_root = _train_run / 'run', _train_run / 'data'
    kept, other, later = tmp_path / 'kept', tmp_path / 'other', tmp_path / 'later'
    shutil.copytree(run, kept, ignore=shutil.ignore_patterns('*.pt'))  # the .pt files deleted to save space
    shutil.copytree(run, other)
    before = {d: _sha256s(d) for d in (kept, other)}
    evaluate = ['--eval-only', '--checkpoint', str(run / 'best.pt'), '--out-dir']
    for argv, refusal in ((_train_tiny_args(data_root, kept), f'{kept} already holds a run (best.safetensors, '),
                          (evaluate + [str(kept)], f'--out-dir {kept} holds the files of another run or evaluation '
                                                   '(best.safetensors, '),
                          (evaluate + [str(other)], f'--out-dir {other} holds the files of another run or evaluation '
                                                    '(best.pt, ')):
        code, msg = _train_error(argv, capsys)
        assert code != 0 and refusal in msg and '\n' not in msg, msg
    assert {d: _sha256s(d) for d in before} == before
    for _ in range(2):  # (its own outputs: taken)
        train.main(evaluate + [str(tmp_path / 'evaluations')])
    assert len(train.read_jsonl(tmp_path / 'evaluations' / 'metrics.jsonl')) == 2
    # a run continued past its best.pt: its evaluations worse from there on
    shutil.copytree(run, later)
    report = train.report

    def worse(*a, **k):
        scores = report(*a, **k)
        return {t: {**s, TASK_TABLE[t].metric: -1e9 if TASK_TABLE[t].higher else 1e9} for t, s in scores.items()}

    monkeypatch.setattr(train, 'report', worse)
    train.main(['--resume', str(later / 'last.pt'), '--max-iters', '7'])
    monkeypatch.setattr(train, 'report', report)
    best = torch.load(later / 'best.pt', weights_only=True)['step']
    assert best < 7 == torch.load(later / 'last.pt', weights_only=True)['step']
    before = _sha256s(later)
    code, msg = _train_error(['--resume', str(later / 'best.pt')], capsys)
    assert code != 0 and f'its step {best} is not the latest of {later} (step 7)' in msg and '--rewind' in msg, msg
    assert _sha256s(later) == before and '\n' not in msg
    capsys.readouterr()
    train.main(['--resume', str(later / 'best.pt'), '--rewind', '--max-iters', str(best)])  # (to train no further)
    assert (f'note: --rewind: the run to step 7 is kept in {later}/run_to_step7 (last.pt moved; config.json, '
            'curves.png, gates.png, metrics.jsonl, train.jsonl, vis copied)') in capsys.readouterr().out
    after = _sha256s(later)
    for name, digest in before.items():  # (best.* is of the resumed run's past: a better evaluation replaces it)
        assert after.get(f'run_to_step7/{name}', after.get(name)) == digest or name.startswith('best.'), name
    assert [r['step'] for r in _train_losses(later)] == list(range(1, best + 1)) and not (later / 'last.pt').exists()
    shutil.copy(later / 'run_to_step7' / 'last.pt', later / 'copy.pt')  # a checkpoint past the folder's run
    code, msg = _train_error(['--resume', str(later / 'copy.pt')], capsys)
    assert code != 0 and f'its step 7 is past the run in {later} (step {best})' in msg and '\n' not in msg, msg


@pytest.mark.heavy
def test_train_predict_reads_photos_as_a_person_sees_them(_train_run, tmp_path, capsys):
    """--predict on a folder: a phone photo stored sideways (EXIF orientation 6) is predicted upright; a
    16-bit PNG and a float TIFF are scaled from their full range, not clipped; a CMYK JPEG and a torn
    PNG are each said in one line while the others are predicted, and the command then fails; a text
    file is counted. The photos stay byte-identical."""
    photos, ckpt, out = tmp_path / 'photos', str(_train_run / 'run' / 'best.safetensors'), tmp_path / 'out'
    photos.mkdir()
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)  # as the sensor wrote it: 56 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 40 wide, 56 high
    Image.fromarray(stored).save(photos / 'phone.jpg', exif=exif, quality=95)
    grey16 = rng.integers(0, 65536, (30, 20)).astype(np.uint16)
    Image.fromarray(grey16).save(photos / 'grey16.png')
    grey_float = rng.random((30, 20)).astype(np.float32)
    Image.fromarray(grey_float).save(photos / 'float.tif')
    Image.fromarray(stored).convert('CMYK').save(photos / 'print.jpg')
    Image.fromarray(stored).save(photos / 'whole.png')
    (photos / 'torn.png').write_bytes((photos / 'whole.png').read_bytes()[:200])  # a copy cut short
    os.remove(photos / 'whole.png')
    (photos / 'notes.txt').write_text('not a photo')
    assert [Image.open(photos / n).mode for n in ('grey16.png', 'float.tif', 'print.jpg')] == ['I;16', 'F', 'CMYK']
    before = _sha256s(photos)
    code, msg = _train_error(['--predict', str(photos), '--checkpoint', ckpt, '--out-dir', str(out)], capsys)
    lines = capsys.readouterr().out
    assert code != 0 and msg == (f'train.py: error: 2 of the 5 images of {photos} could not be read (each said '
                                 f'above); the others\' predictions are in {out}'), msg
    assert f'{photos}/print.jpg: cannot read the image (an image of PIL mode CMYK, which does not convert' in lines
    assert f'{photos}/torn.png: cannot read the image (' in lines
    assert f'note: {photos}: 1 of its 6 entries are not images by their extension, skipped (e.g. notes.txt)' in lines
    assert sorted(os.listdir(out)) == [f'{n}.{e}' for n in ('float.tif', 'grey16.png', 'phone.jpg')
                                       for e in ('npz', 'png')]
    assert _sha256s(photos) == before
    model = TaskExpert.from_checkpoint(ckpt)
    as_shown = {'phone.jpg': np.rot90(np.asarray(Image.open(photos / 'phone.jpg')), -1),  # turned clockwise
                'grey16.png': np.round(grey16 / 65535 * 255), 'float.tif': np.round(grey_float.astype(float) * 255)}
    for name, rgb in as_shown.items():
        rgb = np.ascontiguousarray(np.broadcast_to(rgb[..., None], (*rgb.shape[:2], 3)) if rgb.ndim == 2 else rgb)
        want, got = predict(model, rgb.astype(np.uint8)), np.load(out / f'{name}.npz')
        assert got['semseg'].shape == rgb.shape[:2] and np.array_equal(got['semseg'], want['semseg']), name
        np.testing.assert_allclose(got['depth'], want['depth'], atol=1e-5, err_msg=name)
    assert predict(model, Image.open(photos / 'phone.jpg'))['depth'].shape == (1, 56, 40)  # the Python API too


@pytest.mark.heavy
@pytest.mark.skipif(not os.path.isdir('/proc/self/task'), reason='reads the process tree from Linux /proc')
def test_train_sigkill_leaves_no_process_and_sighup_stops_as_sigterm(_train_run, tmp_path, monkeypatch, capsys):
    """SIGKILL (the OOM killer's) during an evaluation: the boundary workers, multiprocessing's resource
    tracker and the data loaders all end with the run, and a --resume at once takes its lock over.
    SIGHUP (a closed terminal) then stops that run as SIGTERM does, in one line."""
    p, _, children = _train_until_it_evaluates(_train_run, tmp_path / 'run', '--workers', '1', '--eval-workers', '1')
    assert len(children) >= 3, children  # a boundary worker, the resource tracker, data loader workers
    p.kill()
    p.wait()
    save, last = train.save_checkpoint, tmp_path / 'run' / 'last.pt'

    def hang_up(path, *a, **k):  # the terminal closes once last.pt holds step 3
        save(path, *a, **k)
        if path.endswith('last.pt'):
            os.kill(os.getpid(), signal.SIGHUP)

    def unhandled(*_):
        raise AssertionError('train.py left SIGHUP to its default: the process would die without a word')

    monkeypatch.setattr(train, 'save_checkpoint', hang_up)
    previous = signal.signal(signal.SIGHUP, unhandled)
    try:  # at once: the killed run's lock is free
        code, msg = _train_error(['--resume', str(last), '--max-iters', '3', '--workers', '0', '--eval-workers', '0'],
                                 capsys)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert code != 0 and msg == f'train.py: error: interrupted; {last} holds step 3: continue with --resume {last}', msg
    assert 'stale, taken over' in capsys.readouterr().out
    assert not _still_running(children)


@pytest.mark.parametrize('text, expected', [
    ('{"backbone": "huge"}', 'backbone = "huge" (argument --backbone: invalid choice: \'huge\''),
    ('{"tasks": []}', 'tasks = [] (argument --tasks: expected at least one argument)'),
    ('{"tasks": "depth"}', 'tasks = "depth": not a list of values (e.g. ["depth"])'),
    ('{"taps": 5}', 'taps = 5: not a list of values (e.g. [5])'),
    ('{"img_size": [48]}', 'img_size = [48] (argument --img-size: expected 2 arguments)'),
    ('{"seed": 1.5}', 'seed = 1.5 (argument --seed: invalid int value: \'1.5\')'),
    ('{"workers": 1.5}', 'workers = 1.5 (argument --workers: invalid int value: \'1.5\')'),
    ('{"loss_weights": {"depth": "x"}}', 'loss_weights = {"depth": "x"} (argument --loss-weights: \'depth=x\' is not'),
    ('{"loss_weights": [2]}', 'loss_weights = [2]: not an object of task weights'),
    ('{"amp": "maybe"}', 'amp = "maybe" (argument --amp: invalid choice: \'maybe\''),
    ('{"augment": "maybe"}', 'augment = "maybe": not true or false'),
    ('{"lr": null}', 'lr = null: a value is needed (leave the setting out for its default)'),
    ('{"batch_size": 0}', 'batch_size 0: must be at least 1'),
    ('{"scenes": [10, 0]}', 'scenes 10 0: both must be at least 1'),
])
def test_train_config_file_values_are_checked_as_the_flags_are(text, expected, tmp_path, capsys):
    """--config: each setting of the file is checked by its flag's own rules (type, shape, choices,
    count, range): one line naming the file and the setting, and nothing written."""
    (tmp_path / 'c.json').write_text(text)
    (tmp_path / 'out').write_text('a file: an --out-dir a run would stop at, had the file been taken')
    before = _sha256s(tmp_path)
    code, msg = _train_error(['--config', str(tmp_path / 'c.json'), '--out-dir', str(tmp_path / 'out')], capsys)
    assert code != 0 and f'train.py: error: --config {tmp_path / "c.json"}: {expected}' in msg and '\n' not in msg, msg
    assert _sha256s(tmp_path) == before


def test_train_checkpoint_of_a_diverged_run_is_refused_everywhere(_train_run, tmp_path, monkeypatch, capsys):
    """A checkpoint whose weights are not finite: --eval-only, --predict, --resume and export.py each
    refuse it in one line saying the run diverged."""
    ckpt = torch.load(_train_run / 'run' / 'last.pt', weights_only=True)
    ckpt['model']['heads.depth.pred.weight'][0] = float('nan')
    diverged = str(tmp_path / 'last.pt')
    torch.save(ckpt, diverged)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'photo.png')
    for argv in (['--eval-only', '--checkpoint', diverged], ['--resume', diverged, '--out-dir', str(tmp_path / 'r')],
                 ['--predict', str(tmp_path / 'photo.png'), '--checkpoint', diverged]):
        code, msg = _train_error(argv, capsys)
        assert code != 0 and f'{diverged}: the run that saved it diverged: 1 of its tensors hold NaN' in msg, msg
        assert '\n' not in msg
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', diverged, '--target', 'onnx'])
    with pytest.raises(SystemExit) as e:
        export.main()
    assert str(e.value.code).startswith(f'export.py: {diverged}: the run that saved it diverged'), e.value.code
    assert sorted(os.listdir(tmp_path)) == ['last.pt', 'photo.png']


def test_train_logs_cut_short_are_read_wherever_they_are(_train_run, tmp_path, capsys):
    """metrics.jsonl and train.jsonl ending in a line cut short by a kill or a full disk: --baselines
    reads its runs' (a warning, once), and --eval-only appends its line on a line of its own."""
    run, base = tmp_path / 'run', tmp_path / 'base'
    for folder in (run, base):
        shutil.copytree(_train_run / 'run', folder)
        for name in ('train.jsonl', 'metrics.jsonl'):
            with open(folder / name, 'a') as f:
                f.write('{"step": 7, "loss": 0.12')
    lines = len(open(base / 'metrics.jsonl').readlines())
    train.main(['--eval-only', '--checkpoint', str(run / 'best.pt'), '--baselines', str(base)])
    out = capsys.readouterr().out
    assert out.count(f'warning: {base}/metrics.jsonl line {lines} is cut short or damaged') == 1, out
    assert 'Delta_m' in out
    records = train.read_jsonl(run / 'metrics.jsonl')
    assert records[-1]['eval_only'] == str(run / 'best.pt') and 'delta_m' in records[-1]
    assert len(records) == lines  # each whole line, and the new one after the cut one


def _as_another_user():
    """Root ignores file permissions: as root, run what follows with the effective ids of 'nobody'."""
    if os.geteuid() != 0:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def nobody():
        os.setegid(65534)
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(0)
    return nobody()


def test_train_says_the_right_words(_train_run, tmp_path, monkeypatch, capsys, request):
    """The second round's wrong messages, each now one line with its remedy; nothing written."""
    run, data_root = _train_run / 'run', _train_run / 'data'
    (tmp_path / 'a_file').write_text('mine')
    public = pathlib.Path(tempfile.mkdtemp())  # (reachable by another user)
    request.addfinalizer(lambda: shutil.rmtree(public))
    os.chmod(public, 0o755)
    (public / 'read_only').mkdir(mode=0o555)
    torn = tmp_path / 'torn'
    shutil.copytree(run, torn)
    (torn / 'best.pt').write_bytes((torn / 'best.pt').read_bytes()[:1000])
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    monkeypatch.setenv('HF_ENDPOINT', 'huggingface.co')
    before = _sha256s(tmp_path)
    for argv, expected in (
            (_train_tiny_args(data_root, tmp_path / 'a_file'),
             f'--out-dir {tmp_path}/a_file: a file, not a folder: pass a folder'),
            (_train_tiny_args(data_root, public / 'read_only'),
             f'{public}/read_only/train.lock: Permission denied; the folder is not writable: pass another --out-dir'),
            (['--eval-only', '--checkpoint', str(run)],
             f'{run}: a folder, not a checkpoint: pass one of its files, e.g. {run}/best.pt (last.pt to resume)'),
            (['--resume', str(run)], f'{run}: a folder, not a checkpoint'),
            (_train_tiny_args(data_root, tmp_path / 'new', '--pretrained', str(run / 'last.pt')),
             f'{run}/last.pt: a TaskExpert trained by train.py, not ImageNet weights of a ViT: continue it with '
             '--resume'),
            (_train_tiny_args(data_root, tmp_path / 'new', '--pretrained', 'vit_tiny_patch16_384.augreg_in21k_ft_in1k'),
             "HF_ENDPOINT='huggingface.co' is not a URL of the hub or a mirror (e.g. https://huggingface.co): correct "
             'it, or unset it'),
            (['--resume', str(torn / 'last.pt')],
             f'; it records the run\'s best evaluation: restore it, or move it aside (e.g. to {torn}/best.pt.damaged) '
             'and resume again')):
        with _as_another_user() if 'read_only' in str(argv) else contextlib.nullcontext():
            code, msg = _train_error(argv, capsys)
        assert code != 0 and expected in msg and '\n' not in msg, msg
    assert _sha256s(tmp_path) == before
    assert os.listdir(public / 'read_only') == [] and not (tmp_path / 'new').exists()
    # a synthetic run's config.json on NYUD: its scenes and data folder stay with the synthetic data
    cfg = train.resolve_config(train.parse_args(['--config', str(run / 'config.json'), '--dataset', 'nyud']))
    train.check_config(cfg)
    assert 'scenes' not in cfg and cfg['data_root'] == 'data/NYUDv2' and cfg['backbone'] == 'tiny'


@pytest.mark.heavy
def test_train_config_repeats_a_run_and_flags_override_it(_train_run, tmp_path, capsys):
    """--config a run's config.json repeats it: the same settings (its out-dir aside) and, on the same
    machine, the same losses; a flag beside --config wins; a hand-written file of a few settings gives
    those, the others default. A setting unknown or of the wrong type is a one-line error."""
    a = _train_run / 'run'
    train.main(['--config', str(a / 'config.json'), '--out-dir', str(tmp_path / 'b')])
    first, again = (json.load(open(d / 'config.json')) for d in (a, tmp_path / 'b'))
    assert again == {**first, 'out_dir': str(tmp_path / 'b')}
    assert [r['loss'] for r in _train_losses(tmp_path / 'b')] == [r['loss'] for r in _train_losses(a)]
    cfg = train.resolve_config(train.parse_args(['--config', str(a / 'config.json'), '--max-iters', '2',
                                                  '--loss-weights', 'edge=3']))
    first.pop('out_dir')  # (main adds --out-dir)
    assert cfg == {**first, 'max_iters': 2, 'loss_weights': {**first['loss_weights'], 'edge': 3.0}}
    cfg = train.resolve_config(train.parse_args(['--config', str(a / 'config.json'), '--tasks', 'depth']))
    assert cfg['tasks'] == ['depth'] and cfg['loss_weights'] == {'depth': 5.0}  # a single-task baseline of the run
    (tmp_path / 'some.json').write_text('{"dataset": "nyud", "tasks": ["depth"], "lr": 3e-5, "loss_weights": {"depth": 2}}')
    cfg = train.resolve_config(train.parse_args(['--config', str(tmp_path / 'some.json')]))
    assert (cfg['tasks'], cfg['lr'], cfg['loss_weights'], cfg['backbone'], cfg['img_size']) == (
        ['depth'], 3e-5, {'depth': 2.0}, 'large', [448, 576])
    for text, error in (('{"max_iter": 5}', "unknown setting 'max_iter'"),
                        ('{"lr": "fast"}', 'lr = "fast" (argument --lr: invalid float value'),
                        ('[1, 2]', 'holds a list'), ('{"lr": ', 'not JSON'), (None, 'cannot read it (No such file')):
        if text is not None:
            (tmp_path / 'bad.json').write_text(text)
        code, msg = _train_error(['--config', str(tmp_path / ('bad.json' if text else 'none.json')), '--out-dir',
                                  str(tmp_path / 'c')], capsys)
        assert code != 0 and error in msg and '\n' not in msg and not (tmp_path / 'c').exists(), msg


def test_train_loss_weights_flag_changes_only_the_named_tasks():
    cfg = train.resolve_config(train.parse_args(['--dataset', 'nyud', '--loss-weights', 'normals=2']))
    assert cfg['loss_weights'] == {'semseg': 1.0, 'depth': 1.0, 'normals': 2.0, 'edge': 50.0}  # else the paper's
    cfg = train.resolve_config(train.parse_args(['--dataset', 'pascal']))
    assert cfg['loss_weights'] == {'semseg': 1.0, 'human_parts': 2.0, 'sal': 5.0, 'normals': 10.0, 'edge': 50.0}


def test_train_refuses_to_overwrite_and_needs_checkpoints(_train_run, tmp_path, capsys):
    run = _train_run / 'run'
    before = (run / 'last.pt').stat().st_mtime_ns
    code, msg = _train_error(_train_tiny_args(_train_run / 'data', run), capsys)
    assert code != 0 and 'already holds a run' in msg and '\n' not in msg
    assert (run / 'last.pt').stat().st_mtime_ns == before
    code, msg = _train_error(['--eval-only', '--out-dir', str(tmp_path)], capsys)
    assert code != 0 and 'needs a checkpoint' in msg and '\n' not in msg


@pytest.mark.heavy
def test_train_missing_dataset_prints_download_help(tmp_path, capsys):
    code, msg = _train_error(['--dataset', 'nyud', '--data-root', str(tmp_path / 'none'), '--out-dir',
                              str(tmp_path / 'out')], capsys)
    assert code != 0 and 'nyud data not found' in msg.splitlines()[0] and 'NYUDv2/' in msg, msg
    assert not (tmp_path / 'out').exists()


@pytest.mark.heavy
def test_train_safetensors_is_the_model_to_share(_train_run, tmp_path, monkeypatch, capsys):
    """best.safetensors: the weights alone, with settings, step and metrics; the same model as best.pt,
    read by --eval-only, by --predict (the predict API's maps, saved) and by export.py; not resumable."""
    run = _train_run / 'run'
    shared, full = str(run / 'best.safetensors'), torch.load(run / 'best.pt', weights_only=True)
    model = TaskExpert.from_checkpoint(shared)
    assert model.step == full['step'] and model.config == full['config'] and not model.training
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        got, ref = model(x), TaskExpert.from_checkpoint(str(run / 'best.pt'))(x)
    assert all(torch.equal(got[t], ref[t]) for t in ref)
    assert os.path.getsize(shared) < 0.6 * os.path.getsize(run / 'best.pt')  # no Adam moments, no RNG states
    # --eval-only: the metrics the run logged at that step, which the file's metadata also holds
    capsys.readouterr()
    train.main(['--eval-only', '--checkpoint', shared, '--out-dir', str(tmp_path / 'eval'), '--eval-workers', '1'])
    # its summary is the measure of what an evaluation costs: images, seconds, images/s
    out = capsys.readouterr().out
    assert re.search(r'eval at step \d+ \(2 val images, [\d.]+ s, [\d.]+ img/s\)', out), out
    line = json.loads(open(tmp_path / 'eval' / 'metrics.jsonl').readline())
    logged = [e for e in map(json.loads, open(run / 'metrics.jsonl')) if e['step'] == model.step][0]
    assert line['eval_only'] == shared and {t: line[t] for t in model.tasks} == {t: logged[t] for t in model.tasks}
    assert read_checkpoint(shared)['metrics'] == {t: logged[t] for t in model.tasks}
    # --predict: per image a panel (at most the network size) and the maps at the image's size
    photos = tmp_path / 'photos'
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(photos / 'a.jpg')
    Image.fromarray(np.linspace(0, 255, 200 * 120 * 3).astype(np.uint8).reshape(200, 120, 3)).save(photos / 'b.png')
    train.main(['--predict', str(photos), '--checkpoint', shared, '--out-dir', str(tmp_path / 'pred')])
    assert sorted(os.listdir(tmp_path / 'pred')) == ['a.jpg.npz', 'a.jpg.png', 'b.png.npz', 'b.png.png']
    with Image.open(tmp_path / 'pred' / 'a.jpg.png') as a, Image.open(tmp_path / 'pred' / 'b.png.png') as b:
        assert a.size == (5 * 70, 14 + 50) and b.size == (5 * 38, 14 + 64)  # input + 4 tasks; b shrunk to fit 64x96
    for name, size in (('a.jpg', (50, 70)), ('b.png', (200, 120))):
        with Image.open(photos / name) as im:
            api = predict(model, im)
        saved = np.load(tmp_path / 'pred' / f'{name}.npz')
        assert sorted(saved.files) == sorted(api) and api['semseg'].shape == api['depth'].shape[1:] == size
        for k in api:
            np.testing.assert_array_equal(saved[k], api[k])
    # export.py: ONNX from the weights-only file, checked against PyTorch
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', shared, '--target', 'onnx',
                                      '--out-dir', str(tmp_path / 'onnx')])
    export.main()
    assert 'check passed' in capsys.readouterr().out
    props = {p.key: p.value for p in onnx.load(tmp_path / 'onnx' / 'taskexpert_synthetic_tiny_64x96.onnx').metadata_props}
    assert props['step'] == str(model.step)
    code, msg = _train_error(['--resume', shared, '--out-dir', str(tmp_path / 'resumed')], capsys)
    assert code != 0 and 'weights alone' in msg and '\n' not in msg


@pytest.mark.heavy
def test_train_save_predictions_writes_the_files_seism_scores(tmp_path, capsys):
    """--eval-only --save-predictions on rooms of NYUD's size (425x560, padded to 432x560): one file per
    val image and task at the image's size, as InvPT writes them (edge: uint8(255 sigmoid), truncated),
    and the odsF logged is the odsF of those 8-bit edge PNGs. --eval-only prints each class's IoU."""
    root = data.make_synthetic(str(tmp_path / 'rooms'), 0, 2, (425, 560))
    cfg = train.resolve_config(train.parse_args(['--dataset', 'nyud', '--data-root', root, '--img-size', '432', '560',
                                                  '--backbone', 'tiny', '--taps', '1', '2', '--num-experts', '2',
                                                  '--expert-dim', '16']))
    torch.manual_seed(0)
    model = TaskExpert.from_config(cfg).eval()
    save_weights(str(tmp_path / 'model.safetensors'), model, 7, cfg, {}, 'untrained, for a test')
    train.main(['--eval-only', '--save-predictions', '--checkpoint', str(tmp_path / 'model.safetensors'),
                '--out-dir', str(tmp_path / 'eval'), '--batch-size', '1', '--workers', '0', '--eval-workers', '0'])
    logged = json.loads(open(tmp_path / 'eval' / 'metrics.jsonl').readline())
    table = capsys.readouterr().out.split('semseg IoU per class (%):\n')[1]  # each class by name, with its IoU
    assert len(logged['semseg']['class_IoU']) == 40
    assert all(f'{name} {v:5.1f}' in table for name, v in logged['semseg']['class_IoU'].items())
    folder, val = tmp_path / 'eval' / 'val_step7', data.NYUD(root, split='val', train=False, size=(432, 560))
    assert sorted(os.listdir(folder)) == ['depth', 'edge', 'normals', 'semseg']
    assert sorted(os.listdir(folder / 'edge')) == [f'{i}.png' for i in val.ids]
    counts = 0
    with torch.no_grad():  # both rooms in one batch, as the evaluation ran them (train.EVAL_BATCH images at least)
        outs = model(torch.stack([val[i]['image'] for i in range(len(val))]))
    for i, id_ in enumerate(val.ids):
        sample = val[i]
        out = {t: o[i, :, :425, :560] for t, o in outs.items()}  # the image's pixels
        files = {t: np.asarray(Image.open(folder / t / f'{id_}.png')) for t in ('edge', 'semseg', 'normals')}
        assert files['edge'].dtype == np.uint8 and files['edge'].shape == (425, 560)
        np.testing.assert_array_equal(files['edge'], (255 * torch.sigmoid(out['edge'][0])).to(torch.uint8).numpy())
        np.testing.assert_array_equal(files['semseg'], out['semseg'].argmax(0).numpy())  # class indices 0..39
        normals = (torch.nn.functional.normalize(out['normals'], dim=0) + 1) * 255 / 2
        np.testing.assert_array_equal(files['normals'], normals.to(torch.uint8).permute(1, 2, 0).numpy())
        depth = scipy.io.loadmat(folder / 'depth' / f'{id_}.mat')['depth']
        np.testing.assert_array_equal(depth, out['depth'][0].clamp(min=0).numpy())  # metres
        counts = counts + data._edge_counts(files['edge'] / 255, sample['edge'][0, :425, :560].numpy(), 0.011)
    assert logged['edge']['odsF'] == 100 * data._f_measure(counts).max() and 0 < logged['edge']['odsF'] < 100


@pytest.mark.heavy
def test_train_single_task_runs_give_delta_m(_train_run, tmp_path, capsys):
    """--tasks depth trains and evaluates a single-task model end to end; one such run per task as
    --baselines gives each evaluation of a multi-task run Delta_m over the runs' last evaluations. A
    run's last evaluation is marked as the one to report, as best.safetensors' metadata says."""
    runs = [str(tmp_path / t) for t in TASKS['nyud']]
    train.main(_train_tiny_args(_train_run / 'data', runs[1], '--tasks', 'depth', '--max-iters', '4', '--eval-every',
                                '2', '--save-predictions'))
    for t, run, value in zip(TASKS['nyud'], runs, (12.5, None, 20.0, 40.0)):  # the others' folders as runs leave them
        if value is not None:
            os.makedirs(run)
            json.dump({'dataset': 'synthetic', 'tasks': [t]}, open(os.path.join(run, 'config.json'), 'w'))
            with open(os.path.join(run, 'metrics.jsonl'), 'w') as f:  # the last evaluation counts
                for step, v in ((2, 2 * value), (4, value)):
                    f.write(json.dumps({'step': step, t: {TASK_TABLE[t].metric: v}}) + '\n')
    depth = tmp_path / 'depth'
    assert json.load(open(depth / 'config.json'))['loss_weights'] == {'depth': 5.0}
    model = TaskExpert.from_checkpoint(str(depth / 'best.safetensors'))
    assert list(model.heads) == ['depth'] and [list(m.gates) for m in model.mmoe] == [['depth'], ['depth']]
    evals = [json.loads(line) for line in open(depth / 'metrics.jsonl')][:2]  # (then the input-blind predictors')
    assert [e['step'] for e in evals] == [2, 4] and [e.get('report') for e in evals] == [None, True]
    assert not {'semseg', 'normals', 'edge'} & evals[0].keys()
    assert torch.load(depth / 'best.pt', weights_only=True)['best']['metric'] == 'depth rmse'
    assert 'report the last evaluation' in read_checkpoint(str(depth / 'best.safetensors'))['selection']
    assert os.listdir(depth / 'val_step4') == ['depth'] and not (depth / 'val_step2').exists()  # the last one only
    capsys.readouterr()
    multi = tmp_path / 'multi'
    train.main(_train_tiny_args(_train_run / 'data', multi, '--max-iters', '2', '--eval-every', '1',
                                '--baselines', *runs))
    assert capsys.readouterr().out.count('Delta_m') == 2
    single = {}  # by hand: each task's main metric at the last evaluation of its run
    for t, run in zip(TASKS['nyud'], runs):
        single[t] = [r for r in map(json.loads, open(os.path.join(run, 'metrics.jsonl'))) if t in r][-1][t]
    for e in [r for r in map(json.loads, open(multi / 'metrics.jsonl')) if 'semseg' in r]:
        metric = {t: (e[t][TASK_TABLE[t].metric], single[t][TASK_TABLE[t].metric]) for t in TASKS['nyud']}
        gains = [(1 if TASK_TABLE[t].higher else -1) * (m / b - 1) for t, (m, b) in metric.items()]
        assert e['delta_m'] == pytest.approx(100 * sum(gains) / 4, rel=1e-9, abs=1e-9)
    code, msg = _train_error(_train_tiny_args(_train_run / 'data', tmp_path / 'no', '--baselines', *runs[:3]), capsys)
    assert code != 0 and 'no run for edge' in msg and '\n' not in msg and not (tmp_path / 'no').exists()


def test_train_nyud_starts_from_imagenet_weights_and_offline_says_how_to_fetch_them(tmp_path, monkeypatch, capsys):
    """`python train.py --dataset nyud` starts from the authors' ImageNet checkpoint, fetched once; with
    no network it stops at start with one line naming it and how to fetch it by hand, writing nothing;
    --pretrained none trains from scratch. --help shows each dataset's default weights."""
    root = _data_write_nyud_tree(tmp_path / 'data')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('HF_ENDPOINT', _closed_port_url())
    code, msg = _train_error(['--dataset', 'nyud', '--data-root', root, '--out-dir', str(tmp_path / 'out')], capsys)
    name = 'vit_large_patch16_384.augreg_in21k_ft_in1k'
    assert code != 0 and f'--pretrained: {name}: cannot fetch' in msg and '\n' not in msg, msg
    assert f'curl -L -o {name}.safetensors' in msg and f'--pretrained {name}.safetensors' in msg, msg
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'torch' / 'hub' / 'checkpoints').exists() or \
        not os.listdir(tmp_path / 'torch' / 'hub' / 'checkpoints')
    train.main(_train_nyud_args(root, tmp_path / 'scratch'))  # (--pretrained none)
    assert json.load(open(tmp_path / 'scratch' / 'config.json'))['pretrained'] == 'none'
    for dataset, shown in (('nyud', f'default: imagenet = {name}'), ('pascal', 'vit_large_patch16_384'),
                           ('synthetic', 'default: none')):
        with pytest.raises(SystemExit):
            train.main(['--dataset', dataset, '--help'])
        assert shown in ' '.join(capsys.readouterr().out.split()), dataset
    assert train.resolve_config(train.parse_args(['--dataset', 'pascal', '--backbone', 'base']))['pretrained'] == \
        'vit_base_patch16_384.augreg_in21k_ft_in1k'


@pytest.mark.heavy
@pytest.mark.parametrize('ablation', ['no-memory', 'static'])
def test_train_ablation_trains_evaluates_and_reloads(ablation, _train_run, tmp_path, capsys):
    run = tmp_path / 'run'
    train.main(_train_tiny_args(_train_run / 'data', run, '--max-iters', '2', '--eval-every', '2',
                                '--ablation', ablation, '--taps', '6'))
    assert json.load(open(run / 'config.json'))['ablation'] == ablation
    evals = [json.loads(line) for line in open(run / 'metrics.jsonl')]
    assert evals[0]['gate_memory'] == {}  # no memory to read
    if ablation == 'static':  # no gates: nothing to log or draw
        assert evals[0]['gates'] == {} and not (run / 'gates.png').exists()
    else:
        assert list(evals[0]['gates']) == ['block6'] and len(evals[0]['gates']['block6']['edge']) == 4  # the last tap
        assert (run / 'gates.png').is_file()
    train.main(['--eval-only', '--checkpoint', str(run / 'best.pt'), '--out-dir', str(tmp_path / 'eval'),
                '--eval-workers', '0'])
    model = TaskExpert.from_checkpoint(str(run / 'best.safetensors'))  # as export.py and predict load it
    assert model.ablation == ablation and model.taps == (6,)
    code, msg = _train_error(['--resume', str(run / 'last.pt'), '--ablation', 'none'], capsys)
    assert code != 0 and f"--ablation none differs from the checkpoint's {ablation}" in msg


@pytest.mark.heavy
def test_train_benchmark_prints_its_numbers(capsys):
    train.main(['--benchmark', '--backbone', 'tiny', '--img-size', '32', '48', '--batch-size', '2',
                '--expert-dim', '32', '--device', 'cpu', '--accum-steps', '2', '--grad-checkpoint', 'all'])
    out = capsys.readouterr().out
    for what in ('batch 2 in 2 micro-batch(es)', '--grad-checkpoint all', 'MFU unknown: no peak for CPU (pass --peak-tflops)',
                 'peak memory in training'):
        assert what in out, out
    # the numbers agree with each other: the FLOPs counted, the step time, the images/s and TFLOP/s
    cfg = train.resolve_config(train.parse_args(['--backbone', 'tiny', '--img-size', '32', '48', '--expert-dim', '32']))
    with torch.device('meta'):
        forward, flops = train.count_train_flops(TaskExpert.from_config(cfg))
    number = r'([\d.e+-]+)'
    assert re.search(rf'forward {forward / 1e12:.4g} TFLOP, forward \+ backward {flops / 1e12:.4g} TFLOP', out), out
    img_s, ms = map(float, re.search(rf'train: +{number} img/s +\({number} ms per step', out).groups())
    assert img_s == pytest.approx(2 / (ms / 1000), rel=0.01)
    achieved = float(re.search(rf'{number} TFLOP/s achieved', out)[1])
    assert achieved == pytest.approx(flops * 2 / (ms / 1000) / 1e12, rel=0.01)
    backbone, rest = map(int, re.search(r'backbone (\d+)%, MMoE \+ heads (\d+)%', out).groups())
    assert backbone + rest == 100 and 0 < backbone < 100


def test_train_benchmark_gemm_rate_is_the_flops_of_a_bf16_matmul_over_its_time(monkeypatch):
    """The second MFU's ceiling: 2 n^3 FLOPs of an n x n bf16 matmul over its median time."""
    products = []
    monkeypatch.setattr(train, 'median_seconds', lambda fn, device, warmup, runs: (products.append(fn()), (1e-3, 0))[1])
    assert train.gemm_tflops(torch.device('cpu'), n=64) == pytest.approx(2 * 64 ** 3 / 1e-3 / 1e12)
    assert [(p.shape, p.dtype) for p in products] == [((64, 64), torch.bfloat16)]


@pytest.mark.parametrize('name, peak', [
    ('NVIDIA A100-SXM4-80GB', 312), ('NVIDIA A10', 125), ('NVIDIA A10G', None), ('NVIDIA L4', 121),
    ('NVIDIA L40S', 362), ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756), ('NVIDIA H200', 989),
    ('NVIDIA GeForce RTX 4090', 165), ('Tesla V100-SXM2-32GB', 125), ('Tesla T4', 65),
])
def test_train_benchmark_peak_of_the_gpu_by_name(name, peak, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    assert train.peak_tflops(torch.device('cuda:0')) == (peak, name)


def test_train_benchmark_counts_vit_large_flops_on_any_machine(capsys):
    """The paper model (ViT-L, D 768, 448x576) counted on the meta device: ~1.45 TFLOP forward and
    ~4.34 TFLOP forward + backward per image (backward: twice the forward's matmuls, bar the input
    gradient of the patch embedding), in seconds and without memory."""
    train.main(['--benchmark', '--flops-only', '--backbone', 'large', '--img-size', '448', '576'])
    out = capsys.readouterr().out
    assert 'D=768' in out and 'forward 1.449 TFLOP, forward + backward 4.344 TFLOP' in out, out
    assert 'train:' not in out


# ==================================================================================================
# Export: ONNX and Core ML (export.py)
# ==================================================================================================

_EXPORT_SIZE = (64, 96)  # 4x6 tokens, not square
_EXPORT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'export.py')


def _export_tiny(tasks, **options):
    """ViT-tiny cut to its first 2 blocks, an MMoE at each (the first without memory, the second with
    it): every op type of the full model at a fraction of its export time. Weights are drawn so that
    activations are O(1) as in a trained network; at init they are small, where e.g. GELU's tanh and
    exact forms hardly differ."""
    torch.manual_seed(0)
    taps = (2,) if options.get('ablation', 'none') != 'none' else (1, 2)
    model = TaskExpert(tasks, backbone='tiny', img_size=_EXPORT_SIZE, num_experts=2, expert_dim=16, taps=taps,
                       **options)
    model.backbone.blocks = model.backbone.blocks[:2]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def _export_describe(model, dataset, probabilities=False):
    """The metadata of a model that has no checkpoint file (named and hashed as an empty file)."""
    return export.describe({'dataset': dataset, 'backbone': 'tiny'}, model.tasks, probabilities, _EXPORT_SIZE,
                           os.devnull, 0)


def _export_assert_metadata_describes(file, model, dataset, size):
    """An exported file's metadata against the model it holds and the class tables: its tasks in the
    model's order; each class map's class names, one per output channel of the model, as the meters name
    them (data.CLASS_NAMES), listed by id in the output's description; the input size, that of the
    file's input; the normalisation its text states, taskexpert.normalise; the padding colour, the
    model's zero input (what training pads with)."""
    if file.endswith('.onnx'):
        proto = onnx.load(file)
        meta = {p.key: p.value for p in proto.metadata_props}
        described = {o.name: o.doc_string for o in proto.graph.output}
        input_hw = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[2:]]
    else:
        spec = export.import_coremltools().models.MLModel(file, skip_model_load=True).get_spec()
        meta = dict(spec.description.metadata.userDefined)
        described = {o.name: o.shortDescription for o in spec.description.output}
        image = spec.description.input[0].type.imageType
        input_hw = [image.height, image.width]
    assert meta['tasks'].split(',') == list(model.tasks) and meta['dataset'] == dataset
    classes = json.loads(meta['classes'])
    assert list(classes) == [t for t in model.tasks if TASK_TABLE[t].kind == 'classes'] and classes
    for task, names in classes.items():
        assert names == list(data.CLASS_NAMES[taskexpert.TASK_SET[dataset]][task]) and len(names) == model.tasks[task]
        assert described[task].endswith(f'{len(names)} classes, ' + ', '.join(f'{i} {n}' for i, n in enumerate(names)))
    assert meta['input_size'] == f'{size[0]}x{size[1]}' and input_hw == list(size)
    stated = re.search(r'\(x / 255 - mean\) / std per channel, ImageNet mean \(([^)]*)\), std \(([^)]*)\)',
                       meta['normalisation'])
    mean, std = (torch.tensor([float(v) for v in stated[k].split(',')]).view(3, 1, 1) for k in (1, 2))
    frame = torch.arange(256.0).repeat(3, 1, 1)  # every 8-bit value, in each channel
    torch.testing.assert_close(normalise(frame), (frame / 255 - mean) / std, rtol=0, atol=1e-6)
    assert normalise(torch.tensor(json.loads(meta['padding'])).view(3, 1, 1)).abs().max() < 1e-6


def _export_calibration(rooms, tasks):
    """export.py's ONNX int8 calibration frames of a val split (export.val_frames: 32 spread over it)."""
    args = types.SimpleNamespace(val_images=0, calib_images=32, data_root=rooms)
    return export.val_frames(args, {'dataset': 'nyud'}, _EXPORT_SIZE, tasks, True)[2]


@pytest.fixture(scope='module')
def _export_rooms(tmp_path_factory):
    """A val split of 40 synthetic rooms at the export size (the NYUD layout), to calibrate ONNX int8 on."""
    return data.make_synthetic(str(tmp_path_factory.mktemp('rooms')), 1, 40, size=_EXPORT_SIZE)


@pytest.fixture(scope='module')
def _export_onnx_files(tmp_path_factory, _export_rooms):
    """The nyud tiny model exported to ONNX with fp32 weights, then int8 quantized from that file and
    calibrated on val rooms, as export.py does when asked for both -> (model, {weights: path})."""
    model = _export_tiny(TASKS['nyud'])
    app = export.AppModel(model)
    folder = tmp_path_factory.mktemp('onnx')
    paths = {w: str(folder / f'model_{w}.onnx') for w in ('fp32', 'int8')}
    export.export_onnx(app, _EXPORT_SIZE, paths['fp32'], 'fp32', *_export_describe(model, 'nyud'))
    export.export_onnx(app, _EXPORT_SIZE, paths['int8'], 'int8', *_export_describe(model, 'nyud'), fp32=paths['fp32'],
                       calibration=_export_calibration(_export_rooms, model.tasks))
    return model, paths


@pytest.mark.heavy
@pytest.mark.parametrize('weights', ['fp32', 'int8'])
def test_export_onnx_matches_pytorch_at_another_batch(_export_onnx_files, weights):
    model, paths = _export_onnx_files
    how, lines = export.check_onnx(paths[weights], model, False, _EXPORT_SIZE, weights)  # raises if out of tolerance
    assert ('3 rooms' if weights == 'int8' else '3 frames') in how and weights in how  # exported at batch 2
    proto = onnx.load(paths[weights])
    assert [o.name for o in proto.graph.output] == list(TASKS['nyud']) and len(lines) == 5
    assert all(o.doc_string for o in proto.graph.output)
    props = {p.key: p.value for p in proto.metadata_props}
    _export_assert_metadata_describes(paths[weights], model, 'nyud', _EXPORT_SIZE)
    assert props['weights'] == export.WEIGHTS['onnx'][weights]
    assert proto.graph.input[0].name == 'image'
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch
    assert {o.domain: o.version for o in proto.opset_import}[''] == 20  # the pinned opset
    # int8: each Linear and 3x3 conv weight stored once, in int8 (no fp32 copy left), the other
    # parameters in fp32; the Linears as MatMulInteger (dynamic), the heads' 3x3 convs between QDQ pairs
    # (static); standard ONNX ops only; no stored value subnormal, and the check ran again with
    # subnormals flushed
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [head.conv for head in model.heads.values()]  # the 3x3 convs (the 1x1 ones stay fp32)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count('MatMulInteger') == (len(linears) if weights == 'int8' else 0)
    made_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    read_by = {}
    for n in proto.graph.node:
        for i in n.input:
            read_by.setdefault(i, set()).add(n.op_type)
    heads = [n for n in proto.graph.node if n.op_type == 'Conv' and '.heads.' in n.input[1]]
    # (a quantized weight's name ends in _DequantizeLinear_Output)
    three = [n for n in heads if '.conv.weight' in n.input[1]]
    one = [n for n in heads if n.input[1].endswith('.pred.weight')]
    assert len(three) == len(one) == len(convs) and len(heads) == 2 * len(convs)
    assert {made_by.get(i) for n in three for i in n.input[:2]} == ({'DequantizeLinear'} if weights == 'int8' else
                                                                    {None, 'Resize'})
    # the 1x1 prediction convs read the GELU with fp32 weights, and their outputs, the predictions, are
    # upsampled as they are, not rounded to 8 bits in a calibrated range; the patch embedding is fp32 too
    assert {made_by.get(i) for n in one for i in n.input[:2]} == {None, 'Gelu'}
    assert set().union(*(read_by[n.output[0]] for n in one)) <= {'Resize', 'Shape'}
    patch = [n for n in proto.graph.node if n.op_type == 'Conv' and n.input[1].endswith('patch_embed.proj.weight')]
    assert len(patch) == 1 and made_by.get(patch[0].input[1]) is None
    assert all(n.domain in ('', 'ai.onnx') for n in proto.graph.node)
    stored = sum(onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer)
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    expected = fp32_bytes - (3 * sum(m.weight.numel() for m in linears + convs) if weights == 'int8' else 0)
    assert 0.99 * expected < stored < 1.02 * expected  # (the unused final LayerNorm is not stored)
    assert export.onnx_subnormals(paths[weights]) == {} and 'with subnormals flushed to zero' in lines[-1]


@pytest.mark.heavy
def test_export_onnx_int8_is_calibrated_on_the_frames_an_app_feeds(_export_onnx_files, _export_rooms, tmp_path):
    """ONNX int8 is calibrated on val images as a camera gives them (0-255, as stored), 32 spread over the
    split; on a model whose activations are O(1), as a trained one's, the ranges calibrated on them cover
    every value that the int8 check's rooms give each quantized activation, to within one 8-bit step.
    (Frames left normalised,
    about -2..2, are a black image to the model: their ranges leave up to a tenth of an activation's
    values out.)"""
    model, paths = _export_onnx_files
    val = data.NYUD(_export_rooms, 'val')
    spread = np.linspace(0, len(val) - 1, 32).round().astype(int)
    stored = [np.asarray(Image.open(val.path('image', val.ids[i]))).transpose(2, 0, 1) for i in spread]
    assert np.array_equal(_export_calibration(_export_rooms, model.tasks), np.stack(stored).astype(np.float32))
    proto = onnx.load(paths['int8'])
    stored = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    ranges = {}  # activation -> the range its uint8 holds, widened by one step either side
    for n in proto.graph.node:
        if n.op_type == 'QuantizeLinear' and n.input[0] not in stored:
            scale, zero = stored[n.input[1]], int(stored[n.input[2]])
            ranges[n.input[0]] = (-1 - zero) * scale, (256 - zero) * scale
    assert len(ranges) == 2 * len(model.heads)  # each 3x3 conv's input and output (uint8, one scale each)
    probe = onnx.load(paths['fp32'])  # the fp32 file, those activations as outputs
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ranges)
    onnx.save(probe, tmp_path / 'probe.onnx')
    values = export.load_onnx(str(tmp_path / 'probe.onnx'))(export.check_images(3, _EXPORT_SIZE, seed=1, noise=False))
    for name, (lo, hi) in ranges.items():
        assert lo <= values[name].min() and values[name].max() <= hi, (name, lo, hi, values[name])


@pytest.mark.heavy
def test_export_onnx_probabilities_and_options(tmp_path):
    """pascal: human parts, the optional softmax outputs, the other gate and memory options."""
    model = _export_tiny(TASKS['pascal'], gate='image', memory_write='add')
    app = export.AppModel(model, probabilities=True)
    path = str(tmp_path / 'model.onnx')
    export.export_onnx(app, _EXPORT_SIZE, path, 'fp32', *_export_describe(model, 'pascal', True))
    how, lines = export.check_onnx(path, model, True, _EXPORT_SIZE, 'fp32')
    names = [o.name for o in onnx.load(path).graph.output]
    assert names == app.output_names and len(lines) == len(names) + 1  # + the flushed run's
    assert 'semseg_prob' in names and 'human_parts_prob' in names and 'sal' in names
    _export_assert_metadata_describes(path, model, 'pascal', _EXPORT_SIZE)  # VOC's classes and the part groups


@pytest.mark.heavy
@pytest.mark.parametrize('layer', ['first MatMul', 'depth head conv'])
def test_export_onnx_check_catches_a_wrong_scale(_export_onnx_files, tmp_path, layer):
    """A quantizer bug that keeps the int8 values but stores a wrong scale for one layer (the first
    attention's qkv, dynamic, 1.5x; the depth head's 3x3 conv, static, 2x: at 1.5x its depth error sits
    at the tolerance, 0.09-0.11 by onnxruntime's version) is caught at the int8 tolerances."""
    model, paths = _export_onnx_files
    proto = onnx.load(paths['int8'])
    inits = {i.name: i for i in proto.graph.initializer}
    if layer == 'first MatMul':
        qkv = next(n for n in proto.graph.node if n.op_type == 'MatMulInteger')
        scale = inits[qkv.input[1].replace('_quantized', '_scale')]
    else:  # the DequantizeLinear that expands the conv's int8 weight
        scale = inits[next(n for n in proto.graph.node if n.op_type == 'DequantizeLinear'
                           and n.input[0] == 'model.heads.depth.conv.weight_quantized').input[1]]
    factor = 1.5 if layer == 'first MatMul' else 2.0
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * factor, scale.name))
    broken = str(tmp_path / 'broken.onnx')
    onnx.save(proto, broken)
    with pytest.raises(export.CheckFailed, match='OUT OF TOLERANCE'):
        export.check_onnx(broken, model, False, _EXPORT_SIZE, 'int8')


@pytest.mark.heavy
@pytest.mark.parametrize('ablation', ['no-memory', 'static'])
def test_export_ablations_match_pytorch(ablation, tmp_path):
    model = _export_tiny(TASKS['nyud'], ablation=ablation)
    app = export.AppModel(model)
    meta, descriptions = _export_describe(model, 'nyud')
    path = str(tmp_path / 'model.onnx')
    export.export_onnx(app, _EXPORT_SIZE, path, 'fp32', meta, descriptions)
    export.check_onnx(path, model, False, _EXPORT_SIZE, 'fp32')  # raises if out of tolerance
    if ablation == 'static':  # its one feature feeds every head; no-memory's MMoE is the full model's first
        path = str(tmp_path / 'model.mlpackage')
        export.export_coreml(app, _EXPORT_SIZE, path, 'fp32', meta, descriptions)
        export.check_coreml(path, model, False, _EXPORT_SIZE, 'fp32')


@pytest.fixture(scope='module')
def _export_coreml_packages(tmp_path_factory):
    """The nyud tiny model converted with each weights choice -> (model, {weights: path})."""
    model = _export_tiny(TASKS['nyud'])
    app = export.AppModel(model)
    meta, descriptions = _export_describe(model, 'nyud')
    folder = tmp_path_factory.mktemp('coreml')
    paths = {}
    for weights in export.WEIGHTS['coreml']:
        paths[weights] = str(folder / f'model_{weights}.mlpackage')
        export.export_coreml(app, _EXPORT_SIZE, paths[weights], weights, meta, descriptions)
    return model, paths


@pytest.mark.heavy
@pytest.mark.parametrize('weights', ['fp32', 'fp16', 'int8', '4bit'])
def test_export_coreml_program_matches_pytorch(_export_coreml_packages, weights):
    model, paths = _export_coreml_packages
    how, lines = export.check_coreml(paths[weights], model, False, _EXPORT_SIZE, weights)
    # the 4 outputs, the run with subnormals flushed, and (fp16 arithmetic) the largest sum inside an op
    assert weights in how and len(lines) == 4 + 1 + (weights != 'fp32')
    assert 'with subnormals flushed to zero' in lines[4]
    assert export.subnormal_parameters(export.load_mil_program(paths[weights])) == {}
    spec = export.import_coremltools().models.MLModel(paths[weights], skip_model_load=True).get_spec()
    assert spec.description.input[0].type.WhichOneof('Type') == 'imageType'
    outputs = {o.name: o for o in spec.description.output}
    assert list(outputs) == list(TASKS['nyud'])
    assert all(o.shortDescription for o in outputs.values())
    types = {n: o.type.multiArrayType.dataType for n, o in outputs.items()}
    array = spec.description.output[0].type.multiArrayType
    assert types['semseg'] == array.INT32 and types['depth'] == types['normals'] == types['edge'] == array.FLOAT32
    _export_assert_metadata_describes(paths[weights], model, 'nyud', _EXPORT_SIZE)
    assert spec.description.metadata.userDefined['weights'] == export.WEIGHTS['coreml'][weights]
    # the compressed weights are in the program, expanded by the constexpr op of their iOS version
    ops = {op.op_type for op in export.load_mil_program(paths[weights]).operations}
    compressed = {'int8': 'constexpr_affine_dequantize', '4bit': 'constexpr_blockwise_shift_scale'}
    assert {op for op in ops if op.startswith('constexpr')} == ({compressed[weights]} if weights in compressed else set())
    size = {w: export.disk_size(p) for w, p in paths.items()}
    assert size['fp16'] < 0.55 * size['fp32'] and size['int8'] < 0.6 * size['fp16'] and size['4bit'] < 0.8 * size['int8']


def _export_scale_coreml_weight(package, out, factor):
    """A copy of an iOS 17 int8 package with the stored scale of its first quantized weight (the patch
    embedding) times factor, written in place in the weight file (MIL blob: a 64-byte record at the
    offset the program names: sentinel, dtype, size in bytes, offset of the data)."""
    shutil.copytree(package, out)
    spec = export.import_coremltools().models.MLModel(out, skip_model_load=True).get_spec()
    main = spec.mlProgram.functions['main']
    op = next(op for op in main.block_specializations[main.opset].operations if op.type == 'constexpr_affine_dequantize')
    blob = os.path.join(out, 'Data', 'com.apple.CoreML', 'weights', 'weight.bin')
    with open(blob, 'r+b') as f:
        raw = bytearray(f.read())
        size, offset = np.frombuffer(raw, np.uint64, 2, op.attributes['scale'].blobFileValue.offset + 8).astype(int)
        scale = np.frombuffer(raw, np.float16, size // 2, offset)
        raw[offset:offset + size] = (scale * factor).astype(np.float16).tobytes()
        f.seek(0)
        f.write(raw)


@pytest.mark.heavy
def test_export_coreml_check_catches_wrong_conversions(_export_coreml_packages, tmp_path):
    model, paths = _export_coreml_packages
    # the GELU's tanh approximation (what coremltools silently changes): small, but far beyond fp32 rounding
    tanh_gelu = copy.deepcopy(model)
    for block in tanh_gelu.backbone.blocks:
        block.mlp.act = nn.GELU(approximate='tanh')
    with pytest.raises(export.CheckFailed, match='OUT OF TOLERANCE'):  # whichever output shows it most
        export.check_coreml(paths['fp32'], tanh_gelu, False, _EXPORT_SIZE, 'fp32')
    # one perturbed weight of the depth head: caught at fp16 tolerances too
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.heads['depth'].pred.weight[0, :8] += 0.05
    for weights in ('fp32', 'fp16'):
        with pytest.raises(export.CheckFailed, match='depth: .* OUT OF TOLERANCE'):
            export.check_coreml(paths[weights], perturbed, False, _EXPORT_SIZE, weights)
    # a quantizer bug: the int8 values right, one layer's stored scale 1.5x
    broken = str(tmp_path / 'broken.mlpackage')
    _export_scale_coreml_weight(paths['int8'], broken, 1.5)
    with pytest.raises(export.CheckFailed, match='OUT OF TOLERANCE'):
        export.check_coreml(broken, model, False, _EXPORT_SIZE, 'int8')


class _PatchEmbedTimes(export.AppModel):
    """The app model with its normalised input scaled by 1 / factor and the patch embedding's weights by
    factor: the same outputs, the weights' magnitudes moved (factor 1 / 255: as if the / 255 of the
    normalisation were folded into the conv)."""

    def __init__(self, model, factor):
        super().__init__(copy.deepcopy(model))
        self.factor = factor
        with torch.no_grad():
            self.model.backbone.patch_embed.proj.weight.mul_(factor)

    def forward(self, image):
        x = normalise(image) / self.factor  # (B, 3, H, W)
        return tuple(postprocess(self.model(x), self.probabilities).values())


@pytest.mark.heavy
def test_export_coreml_subnormal_scales_are_refused_and_flushed_weights_checked(tmp_path):
    """The normalisation folded whole into the patch conv (weights / (255 std)) makes every int8 scale of
    that conv an fp16 subnormal: the check refuses it, naming the op and the count, and hardware that
    flushes them (the flushed run) would see no image at all."""
    model = _export_tiny(TASKS['nyud'])
    path = str(tmp_path / 'folded.mlpackage')
    export.export_coreml(_PatchEmbedTimes(model, 1 / 255), _EXPORT_SIZE, path, 'int8', *_export_describe(model, 'nyud'))
    channels = model.backbone.patch_embed.proj.out_channels
    with pytest.raises(export.CheckFailed, match=f'{channels} quantization parameters are fp16 subnormals.*'
                                                 f'constexpr_affine_dequantize .*patch_embed.*: {channels}$'):
        export.check_coreml(path, model, False, _EXPORT_SIZE, 'int8')
    main = export.load_mil_program(path)
    frames = export.check_images(2, _EXPORT_SIZE)
    normal = [export.run_mil_program(main, f[None])['depth'] for f in frames]
    flushed = [export.run_mil_program(main, f[None], flush=True)['depth'] for f in frames]
    assert np.abs(normal[0] - normal[1]).max() > 0.1 and np.array_equal(flushed[0], flushed[1])
    # fp16 weights: the flushed run fails where flushing changes the outputs (weights x 2^-12: most of
    # the patch embedding's values subnormal)
    path = str(tmp_path / 'tiny_weights.mlpackage')
    export.export_coreml(_PatchEmbedTimes(model, 2 ** -12), _EXPORT_SIZE, path, 'fp16', *_export_describe(model, 'nyud'))
    with pytest.raises(export.CheckFailed, match='^with subnormals flushed to zero, outputs differ'):
        export.check_coreml(path, model, False, _EXPORT_SIZE, 'fp16')


@pytest.mark.heavy
def test_export_coreml_fp16_overflow_inside_an_op_is_caught(tmp_path):
    """Tokens 300x larger: each value still fits fp16 (the patch embedding's output, at most ~1e3), but
    the first LayerNorm's sum of squares over the 192 channels does not: the fp16 check fails naming it."""
    model = _export_tiny(TASKS['nyud'])
    with torch.no_grad():
        model.backbone.patch_embed.proj.weight.mul_(300)
        model.backbone.patch_embed.proj.bias.mul_(300)
    path = str(tmp_path / 'fp16.mlpackage')
    export.export_coreml(export.AppModel(model), _EXPORT_SIZE, path, 'fp16', *_export_describe(model, 'nyud'))
    with pytest.raises(export.CheckFailed, match=r"^layer_norm '.*' forms a sum of .* beyond fp16's 65504"):
        export.check_coreml(path, model, False, _EXPORT_SIZE, 'fp16')


@pytest.mark.heavy
def test_export_readme_python_snippet_letterboxes_like_predict(tmp_path, capsys):
    """docs/export.md's onnxruntime snippet, run as written (its two paths pointed at a test export and at a
    500x375 photo stored sideways with an EXIF orientation): its outputs equal predict's on the upright
    photo within the fp32 file's tolerance, so an app that copies it sees what evaluation sees."""
    size = (384, 512)  # a 500x375 photo fits: padded at the bottom and right
    model = export.at_size(_export_tiny(TASKS['nyud']), size)
    path = str(tmp_path / 'model.onnx')
    meta, descriptions = export.describe({'dataset': 'nyud', 'backbone': 'tiny'}, model.tasks, False, size,
                                         os.devnull, 0)
    export.export_onnx(export.AppModel(model), size, path, 'fp32', meta, descriptions)
    upright = Image.fromarray(export.check_images(1, (375, 500))[0].transpose(1, 2, 0).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to show
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / 'photo.png', exif=exif)  # stored 375 wide
    readme = open(os.path.join(os.path.dirname(_EXPORT_SCRIPT), 'docs', 'export.md')).read()
    code = re.search(r'onnxruntime in Python:\n\n```python\n(.*?)```', readme, re.S)[1]
    for old, new in (("'runs/nyud/taskexpert_nyud_large_448x576.onnx'", repr(path)),
                     ("'room.jpg'", repr(str(tmp_path / 'photo.png')))):
        assert code.count(old) == 1
        code = code.replace(old, new)
    snippet = {}
    exec(code, snippet)
    got = {k: v[None] for k, v in snippet['out'].items()}
    assert got['semseg'].shape == (1, 375, 500) and 'm' in capsys.readouterr().out
    ref = {k: v[None] for k, v in predict(model, upright).items()}
    with torch.no_grad():  # the raw outputs predict post-processed, for the comparison's near-ties
        x = F.pad(normalise(torch.from_numpy(np.array(upright)).permute(2, 0, 1)), (0, 12, 0, 9))[None]
        raw = {t: o[..., :375, :500].numpy() for t, o in model(x).items()}
    export.compare(got, ref, raw, export.TOLERANCE['fp32'])  # raises if out of tolerance


@pytest.mark.heavy
def test_export_depth_is_never_negative_in_any_output(_export_onnx_files, _export_coreml_packages, _train_run,
                                                      tmp_path, capsys):
    """Depth leaves the model clamped at 0, as in the saved .mat files: the ONNX and Core ML files of a
    model whose raw depth is negative on half the pixels, and predict() and --predict's .npz for a
    trained model whose depth head is pushed below 0."""
    model, onnx_paths = _export_onnx_files
    frames = export.check_images(3, _EXPORT_SIZE)
    with torch.no_grad():
        raw = model(normalise(torch.from_numpy(frames)))['depth'].numpy()
    assert (raw < 0).mean() > 0.2  # what there is to clamp
    runs = [export.load_onnx(p) for p in onnx_paths.values()] + [export.load_coreml(_export_coreml_packages[1]['fp16'])]
    for run in runs:
        depth = run(frames)['depth']
        assert depth.min() >= 0 and (depth[raw < -0.5] == 0).all()
    weights = read_checkpoint(str(_train_run / 'run' / 'best.safetensors'))
    weights['model']['heads.depth.pred.bias'] -= 100
    below = TaskExpert.from_config(weights['config'])
    below.load_state_dict(weights['model'])
    save_weights(str(tmp_path / 'below.safetensors'), below, weights['step'], weights['config'], {}, 'a test')
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(tmp_path / 'a.png')
    train.main(['--predict', str(tmp_path / 'a.png'), '--checkpoint', str(tmp_path / 'below.safetensors'),
                '--out-dir', str(tmp_path / 'out')])
    photo = Image.open(tmp_path / 'a.png')
    for depth in (np.load(tmp_path / 'out' / 'a.png.npz')['depth'], predict(below, photo)['depth']):
        assert depth.shape == (1, 30, 50) and (depth == 0).all()


def _export_moves(got, ref, raw, name, tol):
    """Ways to move output `name` of an exported model's outputs `got` at one pixel, each -> (a label, the
    moved outputs, whether the move is within the tolerance row `tol`): just over the limit and just
    under it (x 1.05, x 0.95), at pixels that exercise each part of the output's rule (compare)."""
    kind, r, moves = export.output_kind(name), ref[name], []

    def moved(where, value, label, within):
        out = {k: v.copy() for k, v in got.items()}
        out[name][where] = value
        moves.append((label, out, within))
    if kind == 'classes':  # flips to another class, by the PyTorch logit gap over its near-tie limit
        logits = raw[name]
        top = np.take_along_axis(logits, r[:, None].astype(np.int64), 1)
        gap = top - logits  # (B, C, H, W); 0 at the class itself
        ratio = gap / (tol['logit'] * np.maximum(1, np.abs(top)))
        # over: the gap least above its limit; under: the largest gap below its limit (where |logit| > 1
        # widens the limit, if anywhere)
        for within, pick in ((False, np.where(ratio > 1, ratio, np.inf).argmin()),
                             (True, np.where((ratio > 0) & (ratio < 1), gap, -np.inf).argmax())):
            b, c, y, x = np.unravel_index(pick, ratio.shape)
            if 0 < ratio[b, c, y, x] < np.inf and (ratio[b, c, y, x] < 1) == within:  # (a row may have no near-tie)
                moved((b, y, x), c, f'flip at logit gap {ratio[b, c, y, x]:.3g} x the limit', within)
        return moves
    for factor in (1.05, 0.95):
        if kind == 'normals':  # the error of a raw vector shorter than the median is scaled down by its length
            length = np.linalg.norm(raw[name], axis=1)
            for b, y, x in (np.unravel_index(i, length.shape) for i in (length.argmax(), length.argmin())):
                limit = tol['normals'] * max(1, np.median(length) / length[b, y, x])
                moved((b, 0, y, x), r[b, 0, y, x] + factor * limit, f'x {factor}, raw length {length[b, y, x]:.2f}',
                      factor < 1)
        else:  # binary or depth, at the pixel of its largest value (depths below 1 m: an absolute limit)
            b, c, y, x = np.unravel_index(np.abs(r).argmax(), r.shape)
            limit = tol['depth' if kind == 'depth' else 'prob'] * max(1, abs(r[b, c, y, x]))
            moved((b, c, y, x), r[b, c, y, x] - factor * limit, f'x {factor}', factor < 1)
    return moves


@pytest.mark.heavy
def test_export_each_output_tolerance_catches_an_error_in_that_output_alone(_export_onnx_files, monkeypatch):
    """The fp32 file's outputs on the check's frames, one output moved at one pixel at a time: just over
    its limit (for every row of TOLERANCE, the limit of that output's kind) the comparison fails naming
    that output and no other; just under it, it passes. Depths are checked below 1 m (absolute) and, all
    moved 3 m further, above it (relative). The whole check, check_onnx, names the output too."""
    model, paths = _export_onnx_files
    images = export.check_images(3, _EXPORT_SIZE, seed=1)  # the fp32 check's frames
    got, (ref, raw) = export.load_onnx(paths['fp32'])(images), export.reference(model, images, False)
    far = {**got, 'depth': got['depth'] + 3}, {**ref, 'depth': ref['depth'] + 3}
    exercised = set()
    for row, tol in export.TOLERANCE.items():
        for outputs, refs in ((got, ref), far):
            for name in ref if outputs is got else ['depth']:
                for label, moved, within in _export_moves(outputs, refs, raw, name, tol):
                    exercised.add((name, within))
                    if within:
                        export.compare(moved, refs, raw, tol)
                        continue
                    with pytest.raises(export.CheckFailed) as e:
                        export.compare(moved, refs, raw, tol)
                    flagged = [line for line in str(e.value).splitlines() if line.endswith('<- OUT OF TOLERANCE')]
                    assert len(flagged) == 1 and flagged[0].strip().startswith(f'{name}: '), (row, name, label, flagged)
    assert exercised == {(name, within) for name in ref for within in (True, False)}
    load = export.load_onnx
    monkeypatch.setattr(export, 'load_onnx', lambda *a, **k: lambda im: _export_moves(
        load(*a, **k)(im), ref, raw, 'normals', export.TOLERANCE['fp32'])[0][1])
    with pytest.raises(export.CheckFailed, match=r'normals: max \|error\| .* OUT OF TOLERANCE'):
        export.check_onnx(paths['fp32'], model, False, _EXPORT_SIZE, 'fp32')


def test_export_compare_allows_ties_only():
    logits = np.zeros((1, 3, 2, 2), np.float32)
    logits[0, 0] = [[5, 1], [1, 1]]  # pixel (0, 0): class 0 clearly; the others: classes 0 and 1 tie
    logits[0, 1] = [[1, 1], [1, 1]]
    ref = {'semseg': logits.argmax(1).astype(np.int32)}
    tie_flip = ref['semseg'].copy()
    tie_flip[0, 1, 1] = 1
    export.compare({'semseg': tie_flip}, ref, {'semseg': logits}, export.TOLERANCE['fp32'])
    real_flip = ref['semseg'].copy()
    real_flip[0, 0, 0] = 1
    with pytest.raises(export.CheckFailed, match='1 not at a near-tie.* OUT OF TOLERANCE'):
        export.compare({'semseg': real_flip}, ref, {'semseg': logits}, export.TOLERANCE['fp16'])


@pytest.fixture(scope='module')
def _export_checkpoint(tmp_path_factory):
    """A train.py-style checkpoint of a small standard model -> (model, path)."""
    torch.manual_seed(0)
    config = dict(dataset='nyud', tasks=list(TASKS['nyud']), backbone='tiny', img_size=[32, 48], num_experts=2,
                  expert_dim=16, taps=[3, 6, 9, 12], gate='token', memory_write='replace', ablation='none',
                  grad_checkpoint='off')
    model = TaskExpert(TASKS['nyud'], backbone='tiny', img_size=(32, 48), num_experts=2, expert_dim=16).eval()
    path = tmp_path_factory.mktemp('checkpoint') / 'last.pt'
    torch.save({'model': model.state_dict(), 'config': config, 'step': 5, 'format': CHECKPOINT_FORMAT}, path)
    return model, path


def test_export_checkpoint_found_and_rebuilt(_export_checkpoint, tmp_path):
    model, checkpoint = _export_checkpoint
    for run, name in (('old', 'last.pt'), ('new', 'last.pt'), ('new', 'best.pt')):
        os.makedirs(tmp_path / 'runs' / run, exist_ok=True)
        shutil.copy(checkpoint, tmp_path / 'runs' / run / name)
    os.utime(tmp_path / 'runs' / 'new' / 'best.pt', (1, 1))  # older than new/last.pt, still preferred
    os.utime(tmp_path / 'runs' / 'old' / 'last.pt', (0, 0))
    path = export.newest_checkpoint(str(tmp_path / 'runs'))
    assert path == str(tmp_path / 'runs' / 'new' / 'best.pt')
    loaded = TaskExpert.from_checkpoint(path)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x)['depth'], model(x)['depth'])
    assert loaded.config['dataset'] == 'nyud' and loaded.step == 5


def test_export_install_swaps_a_package_folder(tmp_path):
    final = tmp_path / 'm.mlpackage'
    work = tmp_path / export.work_dir('m.mlpackage')
    for folder, text in ((final, 'old'), (work / 'm.mlpackage', 'new')):
        folder.mkdir(parents=True)
        (folder / 'weight.bin').write_text(text)
    export.install(str(work / 'm.mlpackage'), str(final))
    assert (final / 'weight.bin').read_text() == 'new'
    assert sorted(os.listdir(tmp_path)) == sorted(['m.mlpackage', work.name])  # the old one inside the work folder


def test_export_install_keeps_the_old_package_when_the_final_move_fails(tmp_path, monkeypatch):
    """The old package is moved aside, then the move of the new one fails (a full disk, a permission):
    the old one is back in place, whole, and the error is raised."""
    final = tmp_path / 'm.mlpackage'
    work = tmp_path / export.work_dir('m.mlpackage')
    for folder, text in ((final, 'old'), (work / 'm.mlpackage', 'new')):
        folder.mkdir(parents=True)
        (folder / 'weight.bin').write_text(text)
    replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(os.path.join(work.name, 'm.mlpackage')):
            raise OSError(28, 'No space left on device')
        replace(src, dst)
    monkeypatch.setattr(os, 'replace', failing_replace)
    with pytest.raises(OSError, match='No space left'):
        export.install(str(work / 'm.mlpackage'), str(final))
    monkeypatch.undo()
    assert (final / 'weight.bin').read_text() == 'old' and os.listdir(final) == ['weight.bin']
    export.remove(str(work))  # what run_target's finally does: the old package survives it
    assert (final / 'weight.bin').read_text() == 'old'


@pytest.mark.heavy
def test_export_metric_change_counts_like_training_evaluation(_export_onnx_files, tmp_path, capsys):
    """The main metrics measured on an exported file's outputs (class maps, probabilities) are those
    training's evaluation gives on the raw outputs of the same model; the synthetic val split is made
    where the checkpoint's config says, as train.py makes it."""
    model, paths = _export_onnx_files
    config = {'dataset': 'synthetic', 'data_root': str(tmp_path / 'synthetic'), 'scenes': [1, 2],
              'img_size': list(_EXPORT_SIZE)}
    val = export.open_val(config, None, _EXPORT_SIZE, model.tasks)
    assert len(val) == 2 and os.path.isfile(tmp_path / 'synthetic' / 'gt_sets' / 'val.txt')
    samples = list(export.read_frames(val, range(2)).values())
    base = export.main_metrics(lambda im: export.reference(model, im, False)[0], samples, model.tasks, 'synthetic')
    results = train.evaluate(model, data.eval_loader(val, 2, workers=0), dataset='synthetic',
                             device=torch.device('cpu')).scores
    assert base == pytest.approx({t: r[TASK_TABLE[t].metric] for t, r in results.items()}, rel=1e-4)
    got = export.main_metrics(export.load_onnx(paths['int8']), samples, model.tasks, 'synthetic')
    line = export.metric_change(got, base)
    assert all(f'{t} {TASK_TABLE[t].metric} {base[t]:.4g} -> ' in line for t in TASKS['nyud']), line
    # the benchmark times each ONNX file next to PyTorch, with every file's size
    export.benchmark(export.AppModel(model), {('onnx', w): p for w, p in paths.items()}, _EXPORT_SIZE, runs=1,
                     warmup=0)
    out = capsys.readouterr().out
    assert 'PyTorch eager' in out and all(f'onnx {w}' in out for w in paths), out
    # and, for comparison, the int8 file's quantization without calibration (dynamic alone), not written
    assert out.count(' MiB ') == 2 and out.count('not written') == 1, out
    assert out.count('the speed of PyTorch eager') == 3 and 'onnx int8 dynamic' in out, out


def _export_cli(*args, cwd):
    return subprocess.run([sys.executable, _EXPORT_SCRIPT, *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.heavy
def test_export_cli_fails_clearly(tmp_path):
    r = _export_cli('--target', 'onnx', '--checkpoint', 'nowhere/best.pt', cwd=tmp_path)
    assert r.returncode != 0 and 'nowhere/best.pt does not exist' in r.stderr
    assert 'python train.py --dataset synthetic' in r.stderr
    r = _export_cli('--target', 'tflite', cwd=tmp_path)
    assert r.returncode != 0 and "invalid choice: 'tflite'" in r.stderr


def test_export_without_checkpoint_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here
    monkeypatch.setattr(sys, 'argv', ['export.py', '--target', 'onnx'])
    with pytest.raises(SystemExit, match='no checkpoint .* under runs/.*python train.py --dataset synthetic'):
        export.main()


def test_export_checkpoint_of_an_older_train_py_is_a_one_line_error(_export_checkpoint, tmp_path, monkeypatch):
    """A checkpoint of a train.py whose model read the last tap without the final LayerNorm (no 'format'):
    its weights would load and give other outputs; refused in one line."""
    ckpt = torch.load(_export_checkpoint[1], weights_only=True)
    del ckpt['format']
    torch.save(ckpt, tmp_path / 'old.pt')
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(tmp_path / 'old.pt'), '--target', 'onnx'])
    with pytest.raises(SystemExit, match=r"^export\.py: .*old\.pt: written by an older train\.py \(its model read "
                                         r"the last tap without the final LayerNorm\)"):
        export.main()


def test_export_bad_checkpoint_error_names_export_py(tmp_path, monkeypatch):
    """A damaged checkpoint given to export.py: one line that names export.py and the file."""
    bad = tmp_path / 'best.pt'
    bad.write_bytes(b'not a checkpoint')
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(bad), '--target', 'onnx'])
    with pytest.raises(SystemExit) as e:
        export.main()
    assert str(e.value.code).startswith('export.py: ') and str(bad) in str(e.value.code), e.value.code
    assert '\n' not in str(e.value.code) and 'train.py' not in str(e.value.code).split(':')[0]


@pytest.mark.parametrize('argv, expected', [
    (['--target', 'onnx', '--weights', 'fp16'], '--weights fp16 with --target onnx: onnxruntime'),
    (['--weights', 'int8', '4bit'], '--weights 4bit with --target onnx: standard ONNX has no 4-bit'),
    (['--target', 'coreml', '--benchmark'], '--benchmark times the ONNX model: add onnx'),
    (['--data-root', 'nowhere'], '--data-root nowhere is not a folder'),
    (['--val-images', '-1'], '--val-images -1: must be 0 or more'),
])
def test_export_impossible_options_are_one_line_errors(argv, expected, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['export.py', *argv])
    with pytest.raises(SystemExit) as e:
        export.main()
    assert str(e.value).startswith('export.py: ') and expected in str(e.value) and '\n' not in str(e.value)


def test_export_failed_target_keeps_old_file_and_exits_nonzero(_export_checkpoint, tmp_path, monkeypatch, capsys):
    """A target whose check fails leaves the existing file untouched, the other target still runs; the
    work folders of killed exports are removed, those of a running one kept."""
    shutil.copy(_export_checkpoint[1], tmp_path / 'last.pt')
    old_onnx = tmp_path / 'taskexpert_nyud_tiny_32x48.onnx'
    old_onnx.write_text('the previous export')
    finished = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    host = socket.gethostname()
    killed = tmp_path / f'taskexpert_nyud_tiny_32x48_fp16.mlpackage.tmp-{host}-{int(finished.stdout)}'
    running = tmp_path / f'taskexpert_nyud_tiny_32x48.onnx.tmp-{host}-{os.getppid()}'
    for work in (killed, running):
        (work / 'model.mlpackage').mkdir(parents=True)

    def write(text):
        def export_fn(app, img_size, path, *args):
            with open(path, 'w') as f:
                f.write(text)
        return export_fn

    def failing_check(path, *args):
        raise export.CheckFailed('outputs differ from PyTorch')
    monkeypatch.setattr(export, 'export_onnx', write('a bad export'))
    monkeypatch.setattr(export, 'check_onnx', failing_check)
    monkeypatch.setattr(export, 'export_coreml', write('a good export'))
    monkeypatch.setattr(export, 'check_coreml', lambda path, *args: ('stub check', ['ok']))
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(tmp_path / 'last.pt'), '--target', 'all',
                                      '--val-images', '0'])
    with pytest.raises(SystemExit, match='failed: onnx fp32$'):
        export.main()
    assert old_onnx.read_text() == 'the previous export'
    assert sorted(os.listdir(tmp_path)) == ['last.pt', 'taskexpert_nyud_tiny_32x48.onnx', running.name,
                                            'taskexpert_nyud_tiny_32x48_fp16.mlpackage']
    assert f'removed {killed.name}' in capsys.readouterr().out


def test_export_int8_onnx_without_val_frames_is_a_one_line_error(_export_checkpoint, tmp_path, monkeypatch):
    ckpt = torch.load(_export_checkpoint[1], weights_only=True)
    ckpt['config']['data_root'] = str(tmp_path / 'NYUDv2')  # trained on data this machine does not have
    torch.save(ckpt, tmp_path / 'last.pt')
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(tmp_path / 'last.pt'), '--target', 'onnx',
                                      '--weights', 'int8'])
    with pytest.raises(SystemExit) as e:
        export.main()
    message = str(e.value)
    assert message.startswith('export.py: ') and '\n' not in message, message
    assert 'ONNX int8 is calibrated on val frames' in message and 'NYUDv2' in message, message
    assert message.endswith('pass --data-root with a val split') and os.listdir(tmp_path) == ['last.pt'], message


def _export_metadata(file):
    """An exported file's metadata (dict) and every text it carries (metadata values, descriptions)."""
    if file.endswith('.onnx'):
        proto = onnx.load(file)
        meta = {p.key: p.value for p in proto.metadata_props}
        return meta, [*meta.values(), *(v.doc_string for v in [*proto.graph.input, *proto.graph.output])]
    spec = export.import_coremltools().models.MLModel(file, skip_model_load=True).get_spec()
    meta = dict(spec.description.metadata.userDefined)
    return meta, [*meta.values(), spec.description.metadata.shortDescription, spec.description.metadata.author,
                  *(f.shortDescription for f in [*spec.description.input, *spec.description.output])]


def _assert_metadata_names_the_checkpoint(file, checkpoint, step, private):
    """The file names its checkpoint by file name, SHA-256 and step, holds no path of this machine (none
    under `private`), and states the letterbox rule and padding."""
    meta, texts = _export_metadata(str(file))
    digest = hashlib.sha256(open(checkpoint, 'rb').read()).hexdigest()
    assert (meta['checkpoint'], meta['checkpoint_sha256'], meta['step']) == (os.path.basename(checkpoint), digest,
                                                                              str(step)), file
    assert json.loads(meta['padding']) == [123.675, 116.28, 103.53] and 'top left' in meta['input']
    assert not [t for t in texts if str(private) in t or re.search(r'(^|[\s\'"(=])/[\w.-]+/', t)], file


@pytest.mark.heavy
def test_export_metadata_names_the_checkpoint_without_a_path(_export_checkpoint, tmp_path, monkeypatch, capsys):
    """A Core ML int8 package (compressed after conversion) keeps the metadata: its checkpoint by file
    name, SHA-256 and step, no path of this machine, the letterbox rule and padding. (ONNX int8, made
    from an fp32 export: test_export_of_some_tasks_with_a_damaged_val_image.)"""
    run = tmp_path / 'private' / 'run'
    run.mkdir(parents=True)
    shutil.copy(_export_checkpoint[1], run / 'last.pt')
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(run / 'last.pt'), '--target', 'coreml',
                                      '--weights', 'int8', '--val-images', '0'])
    export.main()
    _assert_metadata_names_the_checkpoint(run / 'taskexpert_nyud_tiny_32x48_int8.mlpackage', run / 'last.pt', 5, tmp_path)


def test_export_int8_onnx_is_quantized_from_the_fp32_file_of_the_same_run(_export_checkpoint, tmp_path, monkeypatch):
    shutil.copy(_export_checkpoint[1], tmp_path / 'last.pt')
    data.make_synthetic(str(tmp_path / 'rooms'), 1, 5, size=(32, 48))
    calls = []

    def export_onnx(app, img_size, path, weights, meta, descriptions, fp32=None, calibration=None):
        calls.append((weights, fp32 and os.path.basename(fp32), os.path.isfile(fp32 or ''),
                      None if calibration is None else calibration.shape))
        with open(path, 'w') as f:
            f.write(weights)
    monkeypatch.setattr(export, 'export_onnx', export_onnx)
    monkeypatch.setattr(export, 'check_onnx', lambda path, *args: ('stub check', ['ok']))
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(tmp_path / 'last.pt'), '--target', 'onnx',
                                      '--weights', 'int8', 'fp32', '--val-images', '0', '--calib-images', '3',
                                      '--data-root', str(tmp_path / 'rooms')])
    export.main()
    # int8 calibrated on 3 of the 5 val rooms, at the export size
    assert calls == [('fp32', None, False, None), ('int8', 'taskexpert_nyud_tiny_32x48.onnx', True, (3, 3, 32, 48))]
    assert (tmp_path / 'taskexpert_nyud_tiny_32x48_int8.onnx').read_text() == 'int8'


def test_export_file_names_carry_the_tasks_and_the_ablation():
    """A model of some of its dataset's tasks, or an ablated one, is another model: its files have their
    own names (tasks in the dataset's order); the full model's stay as they were."""
    config = {'dataset': 'nyud', 'backbone': 'tiny', 'ablation': 'none'}
    assert export.file_stem(config, TASKS['nyud'], (96, 128)) == 'taskexpert_nyud_tiny_96x128'
    assert export.file_stem(config, {'depth': 1}, (96, 128)) == 'taskexpert_nyud_tiny_96x128_depth'
    assert export.file_stem({**config, 'dataset': 'synthetic', 'ablation': 'static'}, {'edge': 1, 'semseg': 40},
                            (96, 128)) == 'taskexpert_synthetic_tiny_96x128_semseg-edge_static'
    pascal = {'dataset': 'pascal', 'backbone': 'base', 'ablation': 'no-memory'}
    assert export.file_stem(pascal, TASKS['pascal'], (512, 512)) == 'taskexpert_pascal_base_512x512_no-memory'


@pytest.mark.parametrize('where', ['a file', 'under a file'])
def test_export_out_dir_that_cannot_be_written_is_a_one_line_error(_export_checkpoint, tmp_path, monkeypatch, where):
    """--out-dir naming a file, or a folder inside a file: one line naming it, nothing written."""
    shutil.copy(_export_checkpoint[1], tmp_path / 'last.pt')
    (tmp_path / 'exports').write_bytes(b'a file of the user')
    out_dir = str(tmp_path / 'exports' / ('' if where == 'a file' else 'nyud'))
    before = _tree(tmp_path)
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(tmp_path / 'last.pt'), '--target', 'onnx',
                                      '--val-images', '0', '--out-dir', out_dir])
    with pytest.raises(SystemExit) as e:
        export.main()
    message = str(e.value.code)
    assert message.startswith(f'export.py: --out-dir {out_dir} ') and '\n' not in message, message
    assert ('is a file: pass a folder' if where == 'a file' else 'cannot be written (Not a directory)') in message
    assert _tree(tmp_path) == before


@pytest.mark.heavy
@pytest.mark.parametrize('target, older', [('coreml', 'taskexpert_nyud_tiny_32x48_fp16.mlpackage')])
def test_export_full_disk_is_one_line_and_keeps_the_older_file(_export_checkpoint, tmp_path, target, older):
    """Files limited to 1 MB (the file system refuses the first large write, as a full disk does): the
    writer's error (coremltools' weight writer: a RuntimeError that names no errno; torch.onnx's, an
    OSError, is the plain case) ends the run in one line; the older export is byte-identical and no work
    folder is left."""
    shutil.copy(_export_checkpoint[1], tmp_path / 'last.pt')
    if target == 'onnx':
        (tmp_path / older).write_bytes(b'the previous export')
    else:  # a package is a folder
        (tmp_path / older).mkdir()
        (tmp_path / older / 'weight.bin').write_bytes(b'the previous export')
    before = _tree(tmp_path)
    r = _run_with_file_size_limit([sys.executable, _EXPORT_SCRIPT, '--checkpoint', 'last.pt', '--target', target,
                                   '--val-images', '0'], 10 ** 6, tmp_path)
    assert r.returncode != 0 and 'Traceback' not in r.stderr, r.stderr
    error = r.stderr.strip().splitlines()[-1]
    weights = 'fp32' if target == 'onnx' else 'fp16'
    assert error.startswith(f'export.py: {target} {weights}: cannot write {tmp_path / older} ('), error
    assert 'free some space or pass another --out-dir; written: nothing; not written: ' in error, error
    assert _tree(tmp_path) == before


@pytest.mark.heavy
def test_export_of_some_tasks_with_a_damaged_val_image(_export_checkpoint, tmp_path, monkeypatch, capsys):
    """A --tasks depth model exported into the folder of the four-task export, its metric change and
    calibration on val images of which the second is truncated (one of the first --val-images and a
    calibration frame): the four-task file is byte-identical after and the depth model's files are
    beside it under their own names; one warning names the image, the metric change is measured and
    ONNX int8 calibrated on the others, exit status 0."""
    torch.manual_seed(0)
    ckpt = torch.load(_export_checkpoint[1], weights_only=True)
    ckpt['config']['tasks'] = ['depth']
    ckpt['model'] = TaskExpert({'depth': 1}, backbone='tiny', img_size=(32, 48), num_experts=2,
                               expert_dim=16).state_dict()
    torch.save(ckpt, tmp_path / 'depth.pt')
    (tmp_path / 'taskexpert_nyud_tiny_32x48.onnx').write_bytes(b'the four-task export')
    rooms = data.make_synthetic(str(tmp_path / 'rooms'), 1, 4, size=(32, 48))
    damaged = os.path.join(rooms, 'images', data.NYUD(rooms, split='val').ids[1] + '.png')
    with open(damaged, 'r+b') as f:
        f.truncate(os.path.getsize(damaged) // 2)
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(tmp_path / 'depth.pt'), '--target', 'onnx',
                                      '--weights', 'fp32', 'int8', '--val-images', '3', '--calib-images', '4',
                                      '--data-root', rooms])
    export.main()  # no SystemExit: exit status 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if damaged in line]
    assert len(warnings) == 1 and warnings[0].startswith('export.py: warning: val image 1 skipped'), err
    assert 'measured on 2 of the first 3 val images, ONNX int8 calibrated on 3 of 4 frames' in err, err
    assert out.count('main metrics on 2 val images') == 2, out
    assert (tmp_path / 'taskexpert_nyud_tiny_32x48.onnx').read_bytes() == b'the four-task export'
    stem = tmp_path / 'taskexpert_nyud_tiny_32x48_depth'
    assert [o.name for o in onnx.load(f'{stem}.onnx').graph.output] == ['depth']
    _assert_metadata_names_the_checkpoint(f'{stem}_int8.onnx', tmp_path / 'depth.pt', 5, tmp_path)  # from fp32's


@pytest.mark.heavy
@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_export_stopped_by_ctrl_c_or_sigterm_says_so_in_one_line(_export_checkpoint, tmp_path, signum):
    """Ctrl-C (SIGINT) or SIGTERM once the export has started (its first output line): one line saying
    what was written, no traceback, a non-zero exit, no work folder left, the older export byte-identical."""
    shutil.copy(_export_checkpoint[1], tmp_path / 'last.pt')
    (tmp_path / 'taskexpert_nyud_tiny_32x48.onnx').write_bytes(b'the previous export')
    before = _tree(tmp_path)
    p = subprocess.Popen([sys.executable, _EXPORT_SCRIPT, '--checkpoint', 'last.pt', '--target', 'all',
                          '--val-images', '0'], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    try:
        assert p.stdout.readline().startswith('export.py: last.pt (nyud')  # printed as the exports start
        p.send_signal(signum)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()  # (if it is still running: a failed test leaves no export behind)
    name = {signal.SIGINT: 'Ctrl-C', signal.SIGTERM: 'SIGTERM'}[signum]
    assert p.returncode == 128 + signum and 'Traceback' not in err, err
    assert err.strip().splitlines()[-1] == (f'export.py: stopped by {name}, the work folder removed; written: '
                                            'nothing; not written: onnx fp32, coreml fp16 (any older files of their '
                                            'names kept)'), err
    assert _tree(tmp_path) == before


def test_export_killed_during_a_package_swap_gets_the_old_package_back(tmp_path):
    """A kill between install's two moves leaves the old package moved aside in the work folder: the
    next run puts it back before it removes that work folder."""
    finished = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    work = tmp_path / f'm.mlpackage.tmp-{socket.gethostname()}-{int(finished.stdout)}'
    (work / 'previous').mkdir(parents=True)
    (work / 'previous' / 'weight.bin').write_bytes(b'old')
    (work / 'm.mlpackage').mkdir()
    assert export.remove_stale_work(str(tmp_path)) == [work.name]
    assert _tree(tmp_path) == {os.path.join('m.mlpackage', 'weight.bin'): b'old'}


# ==================================================================================================
# A task is a row of the task table: one added by the README's recipe trains, is scored and exported
# ==================================================================================================

@pytest.mark.heavy
def test_a_task_added_by_the_readmes_recipe_trains_evaluates_and_exports(tmp_path, monkeypatch, capsys):
    """README, 'Adding a task', steps 1-3 and nothing else: a second binary task, 'contour', read from NYUD's
    edge maps and judged by the saliency meter (maxF), beside the four NYUD tasks. Two training steps, their
    evaluation, and its ONNX export with its own output, checked against PyTorch."""
    monkeypatch.setitem(TASKS['nyud'], 'contour', 1)  # 1. its head's channels
    monkeypatch.setitem(TASK_TABLE, 'contour', taskexpert.Task('binary', 1.0, 'maxF', True, 'saliency',
                                                               'contour probability'))  # 2. its row
    monkeypatch.setitem(data.NYUD.FILES, 'contour', ('edge', '.png',  # 3. its file and decoding
                                                     lambda p, s: (data._grey(p, 'contour') > 127).astype(np.uint8)))
    run = tmp_path / 'run'
    train.main(_train_tiny_args(tmp_path / 'data', run, '--max-iters', '2', '--eval-every', '2'))
    assert json.load(open(run / 'config.json'))['tasks'] == ['semseg', 'depth', 'normals', 'edge', 'contour']
    losses = [json.loads(line) for line in open(run / 'train.jsonl')]
    assert all(math.isfinite(r['contour']) and r['contour'] > 0 for r in losses)
    scores = json.loads(open(run / 'metrics.jsonl').readline())['contour']
    assert set(scores) == {'maxF'} and 0 < scores['maxF'] <= 100
    assert 'contour' in capsys.readouterr().out  # its line in the evaluation's report
    monkeypatch.setattr(sys, 'argv', ['export.py', '--target', 'onnx', '--checkpoint', str(run / 'best.pt'),
                                      '--data-root', str(tmp_path / 'data'), '--val-images', '2'])
    export.main()
    out = capsys.readouterr().out
    assert re.search(r'onnx fp32: .*\.onnx\n', out) and 'contour: max |error|' in out, out
    onnx_file = next(run.glob('*.onnx'))
    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert meta['tasks'].split(',')[-1] == 'contour'
    outputs = {o.name: o.doc_string for o in onnx.load(str(onnx_file)).graph.output}
    assert outputs['contour'].startswith('contour probability')
