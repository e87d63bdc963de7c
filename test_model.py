import pytest
import torch

from taskexpert import TASKS, TaskExpert, load_pretrained, resample_pos_embed

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
        model(torch.randn(2, 3, *_MODEL_SIZE))
    assert len(model.gates) == 4
    n_tokens = (_MODEL_SIZE[0] // 16) * (_MODEL_SIZE[1] // 16)
    for i, gates in enumerate(model.gates):
        for task, g in gates.items():
            # the first MMoE has no memory yet: it weighs the 5 experts only; later ones add M_t
            assert g.shape == (2, n_tokens, 5 if i == 0 else 6)
            assert (g >= 0).all()
            torch.testing.assert_close(g.sum(-1), torch.ones(2, n_tokens))


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
])
def test_model_every_option_runs_forward_and_backward(opts):
    model = _tiny(TASKS['nyud'], **opts).train()
    out = model(torch.randn(2, 3, *_MODEL_SIZE))
    sum(o.float().mean() for o in out.values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f'{name} got no gradient'


def test_model_other_input_size_and_bf16_autocast():
    model = _tiny(TASKS['nyud']).eval()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 80, 48))  # not the training size: pos-embed resampled for the call
    assert out['semseg'].shape == (1, 40, 80, 48) and torch.isfinite(out['depth'].float()).all()


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


def test_model_rejects_bad_options():
    with pytest.raises(ValueError, match='divisible by 16'):
        TaskExpert(TASKS['nyud'], backbone='tiny', img_size=(100, 96))
    with pytest.raises(ValueError, match='unknown backbone'):
        TaskExpert(TASKS['nyud'], backbone='huge')
    with pytest.raises(ValueError, match='taps'):
        TaskExpert(TASKS['nyud'], backbone='tiny', taps=(3, 13))
