"""Tests of the losses and metrics (DESIGN.md section 5) on cases small enough to work out by hand."""
import math

import numpy as np
import pytest
import torch
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_bipartite_matching

from taskexpert import TASKS, EDGE_THRESHOLDS, MAIN_METRIC, DepthMeter, EdgeMeter, MultiTaskLoss, NormalsMeter, SaliencyMeter, SegMeter, _maximum_matching, thin, delta_m, make_meters



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


def test_metrics_loss_weights_defaults_and_overrides():
    out, batch = _metrics_batch(TASKS['pascal'])
    total, per_task = MultiTaskLoss(TASKS['pascal'])(out, batch)
    expected = {'semseg': 1, 'human_parts': 2, 'sal': 5, 'normals': 10, 'edge': 50}
    assert total.item() == pytest.approx(sum(expected[t] * per_task[t].item() for t in TASKS['pascal']))
    total, per_task = MultiTaskLoss(['semseg', 'edge'], weights={'edge': 1.0})(out, batch)
    assert total.item() == pytest.approx(per_task['semseg'].item() + per_task['edge'].item())
    y = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    x = torch.zeros(1, 1, 1, 2)
    edge = MultiTaskLoss(['edge'], edge_pos_weight=0.5)({'edge': x}, {'edge': y})[1]['edge']
    assert edge.item() == pytest.approx(0.5 * math.log(2))
    with pytest.raises(ValueError, match='unknown task'):
        MultiTaskLoss(['semseg', 'optical_flow'])


def test_metrics_losses_fp32_under_autocast():
    out, batch = _metrics_batch(TASKS['nyud'])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        total, per_task = MultiTaskLoss(TASKS['nyud'])({t: o.bfloat16() for t, o in out.items()}, batch)
    assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in per_task.values())


# ---- dense metrics --------------------------------------------------------------------------------

def _metrics_onehot(labels, C):
    """Labels (B, H, W) -> logits (B, C, H, W) whose argmax is the label."""
    return torch.nn.functional.one_hot(labels, C).permute(0, 3, 1, 2).float()


def test_metrics_seg_known_confusion():
    target = torch.tensor([[[0, 0, 1, 1, 255]]])
    pred = _metrics_onehot(torch.tensor([[[0, 1, 1, 1, 0]]]), 2)
    m = SegMeter(2)
    m.update(pred, target)
    s = m.score()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; the void pixel never counts
    assert s['mIoU'] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert s['pixAcc'] == pytest.approx(75.0)
    # perfect prediction: 100; a class absent from GT and prediction scores 0 (reference behaviour)
    m = SegMeter(3)
    m.update(_metrics_onehot(torch.tensor([[[0, 1, 1]]]), 3), torch.tensor([[[0, 1, 1]]]))
    assert m.score()['mIoU'] == pytest.approx(100 * 2 / 3) and m.score()['pixAcc'] == 100
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


@pytest.mark.parametrize('task', ['semseg', 'depth', 'normals', 'sal', 'edge'])
def test_metrics_two_batches_equal_one_batch(task):
    out, batch = _metrics_batch({task: TASKS['nyud'].get(task, 1)}, B=2, H=24, W=28, seed=3)
    pred, target = out[task].detach(), batch[task]
    whole, halves = make_meters({task: TASKS['nyud'].get(task, 1)}, 'nyud')[task], make_meters({task: TASKS['nyud'].get(task, 1)}, 'nyud')[task]
    whole.update(pred, target)
    halves.update(pred[:1], target[:1])
    halves.update(pred[1:], target[1:])
    assert whole.score() == pytest.approx(halves.score())


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


def test_metrics_edge_perfect_shifted_and_ignored():
    gt = _metrics_outline()  # radius 0.03 x diagonal 80 = 2.4 px
    target = gt.astype(np.float32)
    assert _metrics_edge_score(gt, target)['odsF'] == pytest.approx(100.0)
    assert _metrics_edge_score(_metrics_outline(shift=1), target)['odsF'] == pytest.approx(100.0)
    far = _metrics_edge_score(_metrics_outline(shift=6), target)  # only the horizontal sides still match
    assert far['odsF'] < 80 and far['oisF'] == pytest.approx(far['odsF'])
    # a spurious prediction under void (255) pixels counts neither as prediction nor as GT
    spurious = gt.copy()
    spurious[20:30, 30] = True
    target[18:32, 28:33] = 255
    assert _metrics_edge_score(spurious, target)['odsF'] == pytest.approx(100.0)
    assert _metrics_edge_score(spurious, gt.astype(np.float32))['odsF'] < 100.0


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
    assert make_meters(TASKS['nyud'], 'synthetic')['edge'].max_dist == 0.011 and make_meters(TASKS['nyud'], 'nyud')['semseg'].num_classes == 40
    out, batch = _metrics_batch(TASKS['pascal'], B=1, H=16, W=16)
    for t, m in meters.items():
        m.update(out[t].detach(), batch[t])
        assert MAIN_METRIC[t][0] in m.score()
    with pytest.raises(ValueError, match='unknown dataset'):
        make_meters(TASKS['nyud'], 'cityscapes')
    with pytest.raises(ValueError, match='unknown task'):
        make_meters({'semseg': 40, 'flow': 2}, 'nyud')


def test_metrics_delta_m():
    # semseg +25 % (higher is better), depth rmse 0.5 vs 0.625: -20 % error = +20 % gain
    assert delta_m({'semseg': 50.0, 'depth': 0.5}, {'semseg': 40.0, 'depth': 0.625}) == pytest.approx(22.5)
    assert delta_m({'normals': 20.0}, {'normals': 20.0}) == 0
    with pytest.raises(ValueError, match='no baseline'):
        delta_m({'edge': 70.0}, {})
