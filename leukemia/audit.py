"""The manifest rows and the audit of a preprocessed dataset: per-class counts, sizes and
colour, unreadable and ignored files, exact and near-duplicate groups (which always land in one
split), and the split itself. Pure: arrays and dicts in, rows and a JSON-ready dict out."""

from __future__ import annotations

import numpy as np

from . import data
from .split import (
    SplitParams,
    UnionFind,
    assign_groups,
    duplicate_pairs,
    stratified_group_split,
)


def rows_and_audit(
    files,
    outputs,
    records,
    ignored,
    split: SplitParams,
    manifest_rows,
    max_unreadable,
    root,
    folders,
):
    unreadable = [
        {"path": f.path, "class": f.class_name, "reason": r["error"]}
        for f, r in zip(files, records)
        if "error" in r
    ]
    if len(unreadable) > max_unreadable * len(files):
        shown = "; ".join(f"{u['path']}: {u['reason']}" for u in unreadable[:3])
        raise data.DatasetError(
            f"{len(unreadable)} of {len(files)} image files are unreadable, more than the "
            f"allowed {max_unreadable:.1%} (--max-unreadable); first: {shown}"
        )
    keep = [i for i, r in enumerate(records) if "error" not in r]
    for class_name in data.CLASSES:
        if not any(files[i].class_name == class_name for i in keep):
            raise data.DatasetError(f"class {class_name!r} has no readable images in {str(root)!r}")
    paths = [files[i].path for i in keep]
    labels = [files[i].label for i in keep]
    sha = [records[i]["sha256"] for i in keep]
    dh = [records[i]["dhash"] for i in keep]
    exact, near = duplicate_pairs(sha, dh, split.near_duplicate_distance)

    if manifest_rows is None:
        groups = assign_groups(paths, exact + near, split.group_by, split.block_size)
        splits = stratified_group_split(labels, groups, split.fractions, split.seed)
    else:
        by_path = {r["path"]: r for r in manifest_rows}
        changed = [p for p, s in zip(paths, sha) if by_path[p]["sha256"] != s]
        if changed:
            raise data.DatasetError(
                f"{len(changed)} file(s) changed since the manifest was written "
                f"(sha256 differs), e.g. {changed[0]!r}"
            )
        splits = [by_path[p]["split"] for p in paths]
        given = [by_path[p].get("group", "") for p in paths]
        numbering: dict[str, int] = {}
        groups = [numbering.setdefault(g, len(numbering)) for g in given]

    empty = [name for name in data.SPLITS if name not in splits]
    if empty:
        raise data.DatasetError(
            f"the split leaves no {' and no '.join(empty)} images ({len(paths)} usable images, "
            f"fractions {','.join(f'{v:g}' for v in split.fractions)}); training needs images in "
            "train, val and test: use more images or larger fractions"
        )
    rows = []
    for k, i in enumerate(keep):
        rows.append(
            {
                "path": paths[k],
                "class": files[i].class_name,
                "label": labels[k],
                "split": splits[k],
                "group": groups[k],
                "sha256": sha[k],
                "width": records[i]["width"],
                "height": records[i]["height"],
                "dhash": f"{dh[k]:016x}",
                "processed": outputs[i],
            }
        )
    audit = _audit(
        rows,
        [records[i] for i in keep],
        unreadable,
        ignored,
        exact,
        near,
        split,
        root,
        folders,
        manifest_rows is not None,
    )
    return rows, audit


def _duplicate_groups(paths, classes, pairs) -> list[dict]:
    union = UnionFind(len(paths))
    for i, j, _ in pairs:
        union.union(i, j)
    members: dict[int, list[int]] = {}
    for i in sorted({i for p in pairs for i in p[:2]}):
        members.setdefault(union.find(i), []).append(i)
    out = []
    for idx in members.values():
        group_pairs = [
            [paths[i], paths[j], d] for i, j, d in pairs if union.find(i) == union.find(idx[0])
        ]
        out.append(
            {
                "paths": [paths[i] for i in idx],
                "classes": sorted({classes[i] for i in idx}),
                "pairs": group_pairs,
            }
        )
    return sorted(out, key=lambda g: g["paths"][0])


def _audit(rows, records, unreadable, ignored, exact, near, split, root, folders, from_manifest):
    paths = [r["path"] for r in rows]
    classes = [r["class"] for r in rows]
    per_class = {}
    for class_name in data.CLASSES:
        idx = [k for k, c in enumerate(classes) if c == class_name]
        sizes: dict[str, int] = {}
        for k in idx:
            size = f"{rows[k]['width']}x{rows[k]['height']}"
            sizes[size] = sizes.get(size, 0) + 1
        mean_rgb = np.mean([records[k]["mean_rgb"] for k in idx], axis=0)
        per_class[class_name] = {
            "folder": next(f for f, c in folders.items() if c == class_name),
            "images": len(idx),
            "unreadable": sum(u["class"] == class_name for u in unreadable),
            "sizes": dict(sorted(sizes.items())),
            "mean_rgb": [round(float(v), 2) for v in mean_rgb],
            # Brightness with OpenCV's gray weights, on the class's mean colour.
            "mean_brightness": round(float(mean_rgb @ np.array([0.299, 0.587, 0.114])), 2),
        }
    split_counts = {
        s: {c: sum(1 for r in rows if r["split"] == s and r["class"] == c) for c in data.CLASSES}
        for s in data.SPLITS
    }
    group_sizes = np.bincount([r["group"] for r in rows])
    exact_groups = _duplicate_groups(paths, classes, exact)
    near_groups = _duplicate_groups(paths, classes, near)
    counts = {
        "images": len(rows),
        "unreadable": len(unreadable),
        "ignored_files": len(ignored),
        "exact_duplicate_groups": len(exact_groups),
        "near_duplicate_groups": len(near_groups),
        "groups": int(np.count_nonzero(group_sizes)),
        **{f"{s}_images": sum(split_counts[s].values()) for s in data.SPLITS},
        **{
            f"class_{c.replace(' ', '_').replace('-', '_')}": per_class[c]["images"]
            for c in data.CLASSES
        },
    }
    return {
        "dataset_root": str(root.resolve()),
        "counts": counts,
        "classes": per_class,
        "unreadable": unreadable,
        "ignored_files": ignored,
        "exact_duplicates": exact_groups,
        "near_duplicates": {
            "hash": "dHash 64-bit",
            "max_hamming_distance": split.near_duplicate_distance,
            "groups": near_groups,
        },
        "cross_class_duplicates": [g for g in exact_groups + near_groups if len(g["classes"]) > 1],
        "split": {
            "source": "manifest" if from_manifest else "computed",
            "group_by": split.group_by,
            "counts": split_counts,
            "largest_group": int(group_sizes.max()),
        },
    }
