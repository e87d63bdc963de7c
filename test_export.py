"""Tests of export.py: ONNX and Core ML exports match PyTorch, the checks catch wrong conversions, and
the command line fails clearly. CPU, small models and images."""
import copy
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import export
from taskexpert import TASKS, TaskExpert

_EXPORT_SIZE = (64, 96)  # 4x6 tokens, not square
_EXPORT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'export.py')


def _export_tiny(tasks, **options):
    """ViT-tiny cut to its first 2 blocks, an MMoE at each (the first without memory, the second with
    it): every op type of the full model at a fraction of its export time. Weights are drawn so that
    activations are O(1) as in a trained network; at init they are small, where e.g. GELU's tanh and
    exact forms hardly differ."""
    torch.manual_seed(0)
    model = TaskExpert(tasks, backbone='tiny', img_size=_EXPORT_SIZE, num_experts=2, expert_dim=16, taps=(1, 2),
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
    return export.describe({'dataset': dataset, 'backbone': 'tiny'}, model.tasks, probabilities, _EXPORT_SIZE,
                           'test.pt', 0)


@pytest.mark.parametrize('dataset', ['nyud', 'pascal'])
def test_export_onnx_matches_pytorch_at_another_batch(dataset, tmp_path):
    # pascal also covers the optional softmax outputs and the other gate and memory options
    probabilities = dataset == 'pascal'
    model = _export_tiny(TASKS[dataset], **(dict(gate='image', memory_write='add') if probabilities else {}))
    app = export.AppModel(model, probabilities)
    meta, descriptions = _export_describe(model, dataset, probabilities)
    path = str(tmp_path / 'model.onnx')
    export.export_onnx(app, _EXPORT_SIZE, path, meta, descriptions)  # exported with a batch of 2
    how, lines = export.check_onnx(path, model, probabilities, _EXPORT_SIZE)  # raises if out of tolerance
    assert '3 frames' in how
    proto = onnx.load(path)
    names = [o.name for o in proto.graph.output]
    assert names == app.output_names and len(lines) == len(names)
    assert ('semseg_prob' in names) == probabilities and ('human_parts' in names) == (dataset == 'pascal')
    props = {p.key: p.value for p in proto.metadata_props}
    assert props['tasks'] == ','.join(TASKS[dataset]) and props['input_size'] == '64x96'
    assert proto.graph.input[0].name == 'image'
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch


@pytest.fixture(scope='module')
def _export_coreml_packages(tmp_path_factory):
    """The nyud tiny model converted twice, fp32 and fp16 -> (model, {'fp32': path, 'fp16': path})."""
    model = _export_tiny(TASKS['nyud'])
    app = export.AppModel(model)
    meta, descriptions = _export_describe(model, 'nyud')
    folder = tmp_path_factory.mktemp('coreml')
    paths = {}
    for precision in ('fp32', 'fp16'):
        paths[precision] = str(folder / f'model_{precision}.mlpackage')
        export.export_coreml(app, _EXPORT_SIZE, paths[precision], precision == 'fp16', meta, descriptions)
    return model, paths


@pytest.mark.parametrize('precision', ['fp32', 'fp16'])
def test_export_coreml_program_matches_pytorch(_export_coreml_packages, precision):
    model, paths = _export_coreml_packages
    how, lines = export.check_coreml(paths[precision], model, False, _EXPORT_SIZE, precision == 'fp16')
    assert precision in how and len(lines) == 4
    spec = export.import_coremltools().models.MLModel(paths[precision], skip_model_load=True).get_spec()
    assert spec.description.input[0].type.WhichOneof('Type') == 'imageType'
    outputs = {o.name: o for o in spec.description.output}
    assert list(outputs) == list(TASKS['nyud'])
    assert all(o.shortDescription for o in outputs.values())
    types = {n: o.type.multiArrayType.dataType for n, o in outputs.items()}
    array = spec.description.output[0].type.multiArrayType
    assert types['semseg'] == array.INT32 and types['depth'] == types['normals'] == types['edge'] == array.FLOAT32
    assert spec.description.metadata.userDefined['input_size'] == '64x96'


def test_export_coreml_check_catches_wrong_conversions(_export_coreml_packages):
    model, paths = _export_coreml_packages
    # the GELU's tanh approximation (what coremltools silently changes): small, but far beyond fp32 rounding
    tanh_gelu = copy.deepcopy(model)
    for block in tanh_gelu.backbone.blocks:
        block.mlp.act = nn.GELU(approximate='tanh')
    with pytest.raises(export.CheckFailed, match='normals: .* OUT OF TOLERANCE'):
        export.check_coreml(paths['fp32'], tanh_gelu, False, _EXPORT_SIZE, fp16=False)
    # one perturbed weight of the depth head: caught at fp16 tolerances too
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.heads['depth'].pred.weight[0, :8] += 0.05
    for precision in ('fp32', 'fp16'):
        with pytest.raises(export.CheckFailed, match='depth: .* OUT OF TOLERANCE'):
            export.check_coreml(paths[precision], perturbed, False, _EXPORT_SIZE, precision == 'fp16')


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
    config = dict(dataset='nyud', backbone='tiny', img_size=[32, 48], num_experts=2, expert_dim=16,
                  taps=[3, 6, 9, 12], gate='token', memory_write='replace')
    model = TaskExpert(TASKS['nyud'], backbone='tiny', img_size=(32, 48), num_experts=2, expert_dim=16).eval()
    path = tmp_path_factory.mktemp('checkpoint') / 'last.pt'
    torch.save({'model': model.state_dict(), 'config': config, 'step': 5}, path)
    return model, path


def test_export_checkpoint_found_and_rebuilt(_export_checkpoint, tmp_path):
    model, checkpoint = _export_checkpoint
    for run, name in (('old', 'last.pt'), ('new', 'last.pt'), ('new', 'best.pt')):
        os.makedirs(tmp_path / 'runs' / run, exist_ok=True)
        shutil.copy(checkpoint, tmp_path / 'runs' / run / name)
    os.utime(tmp_path / 'runs' / 'new' / 'best.pt', (1, 1))  # older than new/last.pt, still preferred
    os.utime(tmp_path / 'runs' / 'old' / 'last.pt', (0, 0))
    path = export.find_checkpoint(str(tmp_path / 'runs'))
    assert path == str(tmp_path / 'runs' / 'new' / 'best.pt')
    loaded, config, step = export.load_model(path)
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x)['depth'], model(x)['depth'])
    assert config['dataset'] == 'nyud' and step == 5


def test_export_install_swaps_a_package_folder(tmp_path):
    final, tmp = tmp_path / 'm.mlpackage', tmp_path / 'm.tmp-1.mlpackage'
    for folder, text in ((final, 'old'), (tmp, 'new')):
        folder.mkdir()
        (folder / 'weight.bin').write_text(text)
    export.install(str(tmp), str(final))
    assert (final / 'weight.bin').read_text() == 'new' and os.listdir(tmp_path) == ['m.mlpackage']


def _export_cli(*args, cwd):
    return subprocess.run([sys.executable, _EXPORT_SCRIPT, *args], cwd=cwd, capture_output=True, text=True)


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


def test_export_failed_target_keeps_old_file_and_exits_nonzero(_export_checkpoint, tmp_path, monkeypatch):
    """A target whose check fails leaves the existing file untouched, the other target still runs."""
    shutil.copy(_export_checkpoint[1], tmp_path / 'last.pt')
    old_onnx = tmp_path / 'taskexpert_nyud_tiny_32x48.onnx'
    old_onnx.write_text('the previous export')

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
    monkeypatch.setattr(sys, 'argv', ['export.py', '--checkpoint', str(tmp_path / 'last.pt'), '--target', 'all'])
    with pytest.raises(SystemExit, match='failed: onnx'):
        export.main()
    assert old_onnx.read_text() == 'the previous export'
    assert sorted(os.listdir(tmp_path)) == ['last.pt', 'taskexpert_nyud_tiny_32x48.onnx',
                                            'taskexpert_nyud_tiny_32x48_fp16.mlpackage']
