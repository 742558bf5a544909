"""Loaders for the official on-disk layouts of MARS and iLIDS-VID (and the synthetic stand-in).

They follow the community protocol of torchreid (the one the paper's numbers use) so results are
comparable, but fix what the released KeyRe-ID code gets wrong: frames are sorted by frame
number (not by glob order), every one of the 10 iLIDS-VID splits is usable, and keypoints are
read from a per-tracklet cache (`records.keypoint_cache_path`).

MARS gallery: by default the torchreid protocol, i.e. the test tracklets that are not queries
(9,330 on real MARS; 140 queries then have no valid match and are skipped by the metric).
`gallery="all"` uses all 12,180 test tracklets, as the official MATLAB evaluation does.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from training.records import Dataset, TrackletRecord, attach_keypoints, relabel
from training.tracklets import load_tracklets

MARS_GALLERY_MODES: tuple[str, ...] = ("community", "all")
ILIDSVID_SPLIT_FILE = Path("train-test people splits") / "train_test_splits_ilidsvid.mat"
ILIDSVID_SEQUENCES = Path("i-LIDS-VID") / "sequences"
_MARS_FRAME = re.compile(r"F(\d+)$")


def natural_key(text: str) -> tuple:
    """Sort key that orders embedded numbers numerically: frame 9 before frame 10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def mars_tracklet_key(home_dir: str, first_name: str) -> str:
    """Cache key of a MARS tracklet: its folder and first frame (unique: a frame is in one tracklet)."""
    return f"{home_dir}/{first_name[:4]}/{Path(first_name).stem}"


def ilidsvid_tracklet_key(camera: int, person_dir: str) -> str:
    """Cache key of an iLIDS-VID sequence (one per person and camera)."""
    return f"cam{camera}/{person_dir}"


def _mars_frame_number(name: str) -> int:
    match = _MARS_FRAME.search(Path(name).stem)
    if match is None:
        raise ValueError(f"MARS frame name {name!r} does not end in F<frame number>")
    return int(match.group(1))


def _read_mat(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    content = scipy.io.loadmat(str(path))
    if key not in content:
        raise KeyError(f"{path} has no variable {key!r} (found {sorted(k for k in content if not k.startswith('__'))})")
    return np.asarray(content[key])


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _mars_tracklets(root: Path, names: list[str], rows: np.ndarray, home_dir: str) -> list[TrackletRecord]:
    """Records of MARS track-info rows `[start, end, pid, camid]` (1-based); junk (pid -1) dropped."""
    if rows.ndim != 2 or rows.shape[1] != 4:
        raise ValueError(f"MARS {home_dir} track info must have 4 columns, got shape {rows.shape}")
    records = []
    for row_index, (start, end, pid, camid) in enumerate(rows.astype(np.int64).tolist()):
        if pid == -1:
            continue
        if not (1 <= start <= end <= len(names)):
            raise ValueError(f"MARS {home_dir} track row {row_index}: range {start}..{end} "
                             f"outside the {len(names)} frame names")
        if camid < 1:
            raise ValueError(f"MARS {home_dir} track row {row_index}: camera {camid} is not 1-based")
        frame_names = sorted(names[start - 1:end], key=_mars_frame_number)
        if len({n[:4] for n in frame_names}) != 1 or len({n[4:6] for n in frame_names}) != 1:
            raise ValueError(f"MARS {home_dir} track row {row_index} mixes persons or cameras: "
                             f"{frame_names[0]} .. {frame_names[-1]}")
        frames = tuple(str(root / home_dir / n[:4] / n) for n in frame_names)
        if not Path(frames[0]).is_file():
            raise FileNotFoundError(f"MARS {home_dir} track row {row_index}: missing frame {frames[0]}")
        records.append(TrackletRecord(frames=frames, pid=int(pid), camid=int(camid) - 1,
                                      key=mars_tracklet_key(home_dir, frame_names[0])))
    return records


def load_mars(root: str | Path, keypoints: str | None = None, gallery: str = "community") -> Dataset:
    """MARS from its official layout under `root` (`bbox_train/`, `bbox_test/`, `info/`).

    `gallery="community"` (default, torchreid / the paper's code): test tracklets not in the
    query; `gallery="all"`: every test tracklet (official MATLAB protocol). Distractors (pid 0)
    stay in the gallery; junk (pid -1) is dropped everywhere."""
    if gallery not in MARS_GALLERY_MODES:
        raise ValueError(f"MARS gallery mode {gallery!r} not in {MARS_GALLERY_MODES}")
    root = Path(root)
    info = root / "info"
    train_rows = _read_mat(info / "tracks_train_info.mat", "track_train_info")
    test_rows = _read_mat(info / "tracks_test_info.mat", "track_test_info")
    query_idx = _read_mat(info / "query_IDX.mat", "query_IDX").astype(np.int64).reshape(-1) - 1
    if query_idx.size and (query_idx.min() < 0 or query_idx.max() >= len(test_rows)):
        raise ValueError(f"{info / 'query_IDX.mat'} indexes outside the {len(test_rows)} test tracklets")
    train = _mars_tracklets(root, _read_names(info / "train_name.txt"), train_rows, "bbox_train")
    test_names = _read_names(info / "test_name.txt")
    query_rows = test_rows[query_idx]
    if gallery == "community":
        gallery_rows = np.delete(test_rows, query_idx, axis=0)
    else:
        gallery_rows = test_rows
    query = _mars_tracklets(root, test_names, query_rows, "bbox_test")
    gallery_records = _mars_tracklets(root, test_names, gallery_rows, "bbox_test")
    all_records = train + query + gallery_records
    num_cameras = 1 + max(r.camid for r in all_records)
    return Dataset(
        name="mars",
        train=attach_keypoints(relabel(train), root, keypoints),
        query=attach_keypoints(query, root, keypoints),
        gallery=attach_keypoints(gallery_records, root, keypoints),
        num_cameras=num_cameras,
    )


def ilidsvid_person_dirs(root: str | Path) -> list[str]:
    """Sorted person folder names, checked to be the same in both cameras."""
    sequences = Path(root) / ILIDSVID_SEQUENCES
    cams = []
    for camera in (1, 2):
        cam_dir = sequences / f"cam{camera}"
        if not cam_dir.is_dir():
            raise FileNotFoundError(f"missing iLIDS-VID camera folder {cam_dir}")
        cams.append(sorted(p.name for p in cam_dir.iterdir() if p.is_dir()))
    if cams[0] != cams[1]:
        only = sorted(set(cams[0]) ^ set(cams[1]))
        raise ValueError(f"iLIDS-VID persons differ between cam1 and cam2: {only[:5]}")
    return cams[0]


def ilidsvid_splits(root: str | Path) -> list[tuple[list[str], list[str]]]:
    """The official (train person dirs, test person dirs) of every split.

    `ls_set` rows are permutations of 1..N indexing the sorted person folders (torchreid's
    reading of the file, following Wang et al. ECCV'14): the first half is TEST, the second TRAIN."""
    person_dirs = ilidsvid_person_dirs(root)
    path = Path(root) / ILIDSVID_SPLIT_FILE
    ls_set = _read_mat(path, "ls_set").astype(np.int64)
    num = len(person_dirs)
    if ls_set.ndim != 2 or ls_set.shape[1] != num or num % 2:
        raise ValueError(f"{path}: ls_set shape {ls_set.shape} does not fit {num} persons (even count expected)")
    splits = []
    for i, row in enumerate(ls_set):
        if sorted(row.tolist()) != list(range(1, num + 1)):
            raise ValueError(f"{path}: split {i} is not a permutation of 1..{num}")
        test = sorted(person_dirs[j - 1] for j in row[: num // 2])
        train = sorted(person_dirs[j - 1] for j in row[num // 2:])
        splits.append((train, test))
    return splits


def _person_number(person_dir: str) -> int:
    digits = re.findall(r"\d+", person_dir)
    if not digits:
        raise ValueError(f"iLIDS-VID person folder {person_dir!r} has no number")
    return int(digits[-1])


def _ilidsvid_records(root: Path, person_dirs: list[str], cameras: tuple[int, ...]) -> list[TrackletRecord]:
    records = []
    for person in person_dirs:
        for camera in cameras:
            folder = root / ILIDSVID_SEQUENCES / f"cam{camera}" / person
            frames = sorted((p for p in folder.glob("*.png")), key=lambda p: natural_key(p.stem))
            if not frames:
                raise FileNotFoundError(f"iLIDS-VID sequence {folder} has no .png frames")
            records.append(TrackletRecord(frames=tuple(str(p) for p in frames), pid=_person_number(person),
                                          camid=camera - 1, key=ilidsvid_tracklet_key(camera, person)))
    return records


def load_ilidsvid(root: str | Path, split: int = 0, keypoints: str | None = None) -> Dataset:
    """iLIDS-VID split `split` (0..9): train = both cameras of the train persons (relabelled),
    query = cam1 and gallery = cam2 of the test persons."""
    root = Path(root)
    splits = ilidsvid_splits(root)
    if not 0 <= split < len(splits):
        raise ValueError(f"iLIDS-VID split {split} out of range 0..{len(splits) - 1}")
    train_dirs, test_dirs = splits[split]
    return Dataset(
        name=f"ilidsvid-split{split}",
        train=attach_keypoints(relabel(_ilidsvid_records(root, train_dirs, (1, 2))), root, keypoints),
        query=attach_keypoints(_ilidsvid_records(root, test_dirs, (1,)), root, keypoints),
        gallery=attach_keypoints(_ilidsvid_records(root, test_dirs, (2,)), root, keypoints),
        num_cameras=2,
        query_camera=0,
    )


def load_synthetic(root: str | Path, layout: str = "mars", keypoints: str | None = "groundtruth",
                   split: int = 0, gallery: str = "community", **generator_options: Any) -> Dataset:
    """The synthetic dataset at `root`, generated first if absent (see `training.synthetic`)."""
    from training.synthetic import ensure_synthetic

    ensure_synthetic(root, layout=layout, **generator_options)
    if layout == "mars":
        dataset = load_mars(root, keypoints=keypoints, gallery=gallery)
    else:
        dataset = load_ilidsvid(root, split=split, keypoints=keypoints)
    dataset.name = f"synthetic-{dataset.name}"
    return dataset


_BUILDERS = {"mars": load_mars, "ilidsvid": load_ilidsvid, "ilids-vid": load_ilidsvid,
             "synthetic": load_synthetic, "tracklets": load_tracklets}


def build_dataset(name: str, root: str | Path, **options: Any) -> Dataset:
    """Build a dataset by name: `mars`, `ilidsvid` (`split=0..9`), `synthetic` (`layout=...`) or
    `tracklets` (the watcher's exported tracklets, `training.tracklets`: no query/gallery).
    Every loader takes `keypoints=` a backend name or None."""
    try:
        builder = _BUILDERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(_BUILDERS)}") from None
    return builder(root, **options)
