"""Tests of data.py: readers on tiny trees written here in the real on-disk formats, augmentations,
errors, the synthetic scene generator and the loader. CPU, seconds."""
import json
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import data

# -------------------------------------------------------------------------------------------------
# NYUD-v2 tree (images/, segmentation/, depth/, normals/, edge/, gt_sets/) with known contents
# -------------------------------------------------------------------------------------------------
_DATA_H, _DATA_W = 6, 8


def _data_nyud_sample(k):
    """Image, stored labels (0 void, 1..40), depth (0 invalid), normals png, edge png of sample k."""
    rng = np.random.default_rng(k)
    image = rng.integers(0, 256, (_DATA_H, _DATA_W, 3), dtype=np.uint8)
    seg = np.ones((_DATA_H, _DATA_W), np.uint8)  # wall
    seg[:, 4:] = 40
    seg[0, 0] = 0  # void
    depth = np.full((_DATA_H, _DATA_W), 2.5, np.float32)
    depth[1, 1] = 0  # invalid
    normal = np.array([0.6, 0.0, -0.8])  # unit, pointing right and at the camera
    normals = np.tile(np.round((normal + 1) / 2 * 255).astype(np.uint8), (_DATA_H, _DATA_W, 1))
    normals[2, 2] = 0  # black fill = invalid
    edge = np.zeros((_DATA_H, _DATA_W), np.uint8)
    edge[:, 3:5] = 255
    return image, seg, depth, normals, edge


def _data_write_nyud_tree(root, splits=(('train', ('0001', '0002')), ('val', ('0003',)))):
    for folder in ('images', 'segmentation', 'depth', 'normals', 'edge', 'gt_sets'):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    for split, ids in splits:
        with open(os.path.join(root, 'gt_sets', f'{split}.txt'), 'w') as f:
            f.write('\n'.join(ids) + '\n')
        for id_ in ids:
            image, seg, depth, normals, edge = _data_nyud_sample(int(id_))
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
    assert s['meta'] == {'id': '0003', 'size': (_DATA_H, _DATA_W)}
    assert s['image'].shape == (3, 8, 16) and s['image'].dtype == torch.float32
    mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
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
    # normals decoded to unit vectors, the black pixel and the padding invalid (0)
    n = s['normals'][:, :_DATA_H, :_DATA_W]
    assert torch.allclose(n[:, 0, 0], torch.tensor([0.6, 0.0, -0.8]), atol=0.01)
    assert (n[:, 2, 2] == 0).all() and (s['normals'][:, _DATA_H:] == 0).all()
    norms = n.norm(dim=0)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)
    # edges 0/255 -> {0, 1}, padding 255
    assert set(s['edge'][0, :_DATA_H, :_DATA_W].unique().tolist()) == {0.0, 1.0}
    assert s['edge'][0, 0, 3] == 1 and s['edge'][0, 0, 0] == 0 and (s['edge'][0, _DATA_H:] == 255).all()


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
        assert crop.shape == (10, 12) and (crop == 0).mean() <= 0.75


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


def test_data_collate_and_loader(tmp_path):
    root = _data_write_nyud_tree(tmp_path)
    ds = data.NYUD(root, 'train', train=True, size=(8, 10))
    batch = next(iter(data.build_loader(ds, batch_size=2, train=True, workers=0)))
    assert batch['image'].shape == (2, 3, 8, 10) and batch['semseg'].shape == (2, 8, 10)
    assert batch['depth'].shape == (2, 1, 8, 10) and isinstance(batch['meta'], list) and len(batch['meta']) == 2
    # worker processes: the same seed gives the same augmented batches
    ds.ids = ['0001', '0001']  # one image twice: each worker must augment it differently
    runs = [[b['image'] for b in data.build_loader(ds, 1, True, workers=2, seed=s)] for s in (5, 5, 6)]
    assert all(torch.equal(x, y) for x, y in zip(runs[0], runs[1]))
    assert not torch.equal(*runs[0]) and not torch.equal(runs[0][0], runs[2][0])


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


def test_data_pascal_fixture_matches_reference_layout(tmp_path):
    """The reference readers index the struct by position: ['anno'][0][0][1][0] objects, obj[1] the
    class index, obj[2] the mask, obj[3][0][k] the parts as (name, mask)."""
    root = _data_write_pascal_tree(tmp_path)
    objs = scipy.io.loadmat(os.path.join(root, 'human_parts', '2008_000001.mat'))['anno'][0][0][1][0]
    assert objs[0][1][0][0] == 15 and objs[0][2].shape == (_DATA_PH, _DATA_PW)
    assert str(objs[0][3][0][1][0][0]) == 'ruarm' and len(objs[1][3]) == 0


def test_data_pascal_reader_decodes(tmp_path):
    root = _data_write_pascal_tree(tmp_path)
    ds = data.PASCALContext(root, 'train', train=False, size=(16, 16))
    s = ds[0]
    assert s['meta'] == {'id': '2008_000001', 'size': (_DATA_PH, _DATA_PW), 'has_human': True}
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
    assert s['semseg'][1, 1] == 7 and not s['meta']['has_human']
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
    proot = _data_write_pascal_tree(tmp_path / 'pascal')
    os.remove(os.path.join(proot, 'human_parts', '2008_000003.mat'))
    with pytest.raises(data.DataError, match=r'human_parts.2008_000003\.mat: file not found'):
        data.PASCALContext(proot, 'val')
    scipy.io.savemat(os.path.join(proot, 'pascal-context', 'trainval', '2008_000003.mat'), {'Other': np.zeros(3)})
    with pytest.raises(data.DataError, match="2008_000003.mat: has no 'LabelMap'"):
        data.PASCALContext(proot, 'val', train=False, tasks=('edge',))[0]


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
        normals, edge = s['normals'][:, :120].numpy().transpose(1, 2, 0), s['edge'][0, :120].numpy()
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
        # every label change is an edge, and every edge pixel sits on a label, depth or normal change
        assert edge[:, 1:][seg[:, 1:] != seg[:, :-1]].all() and edge[1:][seg[1:] != seg[:-1]].all()
        ey, ex = np.nonzero(edge)
        found = np.zeros(len(ey), bool)
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            y, x = np.clip(ey + dy, 0, 119), np.clip(ex + dx, 0, 159)
            found |= seg[y, x] != seg[ey, ex]
            found |= np.abs(depth[y, x] - depth[ey, ex]) > 0.05 * depth[ey, ex]
            found |= np.sum(normals[y, x] * normals[ey, ex], -1) < 0.9
        assert found.mean() > 0.97


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
    # a folder holding some other dataset is never overwritten
    with pytest.raises(data.DataError, match='did not write'):
        data.make_synthetic(_data_write_nyud_tree(tmp_path / 'real'), n_train=1, n_val=1)
