"""Part heatmaps: peaks at the joints, follow flips, ignore missing joints, pool exactly."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reid.heatmaps import joint_heatmaps, part_heatmaps, part_patch_importance
from reid.keypoints import BODY_PARTS, PART_FLIP_INDEX, PART_NAMES, flip_keypoints

SIZE = (256, 128)


def _random_pose(seed: int = 0, frames: int = 4) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    xy = rng.uniform([8, 8], [120, 248], size=(frames, 17, 2))
    score = rng.uniform(0.5, 1.0, size=(frames, 17, 1))
    return torch.tensor(np.concatenate([xy, score], -1), dtype=torch.float32)


@pytest.mark.parametrize("x,y", [(0.0, 0.0), (64.0, 128.0), (127.0, 255.0), (37.0, 201.0)])
def test_joint_heatmap_peaks_at_the_keypoint(x, y):
    keypoints = torch.zeros(17, 3)
    keypoints[9] = torch.tensor([x, y, 0.9])
    heatmap = joint_heatmaps(keypoints, SIZE, sigma=6.0)[9]
    peak = divmod(int(heatmap.argmax()), SIZE[1])
    assert peak == (int(y), int(x))
    assert heatmap.max() == pytest.approx(1.0)


@pytest.mark.parametrize("maps", ["joints", "limbs"])
def test_flip_mirrors_heatmaps_and_swaps_left_and_right_parts(maps):
    keypoints = _random_pose()[0]
    flipped = torch.from_numpy(flip_keypoints(keypoints.numpy(), width=SIZE[1]))
    original = part_heatmaps(keypoints, SIZE, sigma=8.0, maps=maps)
    mirrored = part_heatmaps(flipped, SIZE, sigma=8.0, maps=maps)
    expected = original[list(PART_FLIP_INDEX)].flip(-1)
    assert torch.allclose(mirrored, expected, atol=1e-5)
    left_arm, right_arm = PART_NAMES.index("left_arm"), PART_NAMES.index("right_arm")
    assert torch.allclose(mirrored[left_arm], original[right_arm].flip(-1), atol=1e-5)


def test_zero_confidence_joints_contribute_nothing():
    keypoints = _random_pose()[0]
    wrist = 9  # left wrist, with the left elbow it makes the left arm
    without = keypoints.clone()
    without[wrist, 2] = 0.0
    arm = PART_NAMES.index("left_arm")
    assert torch.allclose(part_heatmaps(without, SIZE, 8.0)[arm], joint_heatmaps(keypoints, SIZE, 8.0)[7])
    assert joint_heatmaps(without, SIZE, 8.0)[wrist].abs().max() == 0
    nobody = torch.zeros(17, 3)
    assert part_heatmaps(nobody, SIZE, 8.0).abs().max() == 0


@pytest.mark.parametrize("stride", [16, 12])
def test_patch_importance_equals_average_pooled_full_heatmaps(stride):
    keypoints = _random_pose(frames=4)
    keypoints[2, :, 2] = 0.0  # a frame with no person
    keypoints[1, BODY_PARTS["left_leg"], 2] = 0.0  # one part missing in one frame
    importance = part_patch_importance(keypoints[None], SIZE, 16, stride, sigma=8.0)[0]
    full = part_heatmaps(keypoints, SIZE, 8.0)  # [T, 6, H, W]
    pooled = F.avg_pool2d(full, kernel_size=16, stride=stride).flatten(-2)  # [T, 6, n]
    seen = torch.stack([(keypoints[t, list(j), 2] > 0.1).any(-1) for t in range(4) for j in BODY_PARTS.values()]).view(4, 6)
    expected = (pooled * seen[..., None]).sum(0) / seen.sum(0).clamp(min=1)[:, None]
    assert torch.allclose(importance, expected, atol=1e-5)


def test_a_frame_without_keypoints_does_not_dilute_the_clip():
    keypoints = _random_pose(frames=4)
    clip = part_patch_importance(keypoints[None], SIZE, 16, 16, 8.0)
    blanked = keypoints.clone()
    blanked[3] = 0.0
    three = part_patch_importance(keypoints[None, :3], SIZE, 16, 16, 8.0)
    assert torch.allclose(part_patch_importance(blanked[None], SIZE, 16, 16, 8.0), three, atol=1e-6)
    assert not torch.allclose(clip, three)


def _standing_pose() -> torch.Tensor:
    """A person facing the camera in a 256x128 crop (the synthetic generator's skeleton)."""
    from training.synthetic import SyntheticConfig, make_identities, skeleton

    look = make_identities(SyntheticConfig(), np.random.default_rng(0))[0][0]
    return torch.from_numpy(skeleton(0.85 * 256, 64, 250, 0.0, look, True))


def test_limb_maps_cover_the_limb_and_the_shirt_where_joint_blobs_do_not():
    keypoints = _standing_pose()
    arm, torso = PART_NAMES.index("left_arm"), PART_NAMES.index("torso")
    elbow, wrist = keypoints[7, :2], keypoints[9, :2]
    middle = ((elbow + wrist) / 2).round().long()
    centre = keypoints[[5, 6, 11, 12], :2].mean(0).round().long()
    limbs = part_heatmaps(keypoints, SIZE, sigma=8.0, maps="limbs")
    joints = part_heatmaps(keypoints, SIZE, sigma=8.0, maps="joints")
    assert limbs[arm, middle[1], middle[0]] > 0.95  # on the forearm, between its joints
    assert limbs[torso, centre[1], centre[0]] > 0.8  # the middle of the shirt (near the diagonals)
    assert joints[torso, centre[1], centre[0]] < 1e-3 * joints[torso].max()  # the blob prior misses it
    assert limbs[arm, 5, 5] < 1e-6  # far from the arm: nothing


@pytest.mark.parametrize("stride", [16, 12])
def test_limb_patch_importance_approximates_average_pooled_full_maps(stride):
    keypoints = _random_pose(frames=4)
    keypoints[2, :, 2] = 0.0
    importance = part_patch_importance(keypoints[None], SIZE, 16, stride, sigma=8.0, maps="limbs")[0]
    full = part_heatmaps(keypoints, SIZE, 8.0, maps="limbs")
    pooled = F.avg_pool2d(full, kernel_size=16, stride=stride).flatten(-2)
    expected = pooled[[0, 1, 3]].mean(0)  # frame 2 sees nothing and does not dilute the clip
    assert torch.allclose(importance, expected, atol=0.02)
    assert (importance - expected).abs().mean() < 2e-3
