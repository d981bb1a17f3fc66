"""OME-Zarr 0.6 metadata: valid against the published schemas, read back by another 0.6 reader
with the same affine, and stores written as 0.5 still open."""

from __future__ import annotations

import json
from importlib.resources import files

import numpy as np
import pytest
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource
from referencing.jsonschema import DRAFT202012

from voxelflow import ngff
from voxelflow import store as st
from voxelflow.errors import UnsupportedDataError
from voxelflow.geometry import dicom_affine, level_affine

# ----------------------------------------------------------------------------- fixtures


def _oblique_affine() -> np.ndarray:
    """A double-oblique CT-like stack (DICOM orientation, LPS -> RAS), 0.7 x 0.9 mm in plane and
    2.5 mm slices, so the affine has a rotation, a flip and three different spacings."""
    a, b = np.radians(17.0), np.radians(-24.0)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    col = np.array([-np.sin(a) * np.cos(b), np.cos(a) * np.cos(b), np.sin(b)])
    normal = np.cross(row, col)
    return dicom_affine([*row, *col], position=(-120.5, -98.25, 40.0), pixel_spacing=(0.9, 0.7),
                        slice_step=2.5 * normal)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A store with one oblique 3-D volume (3 pyramid levels) and a label on its grid."""
    root = tmp_path_factory.mktemp("ngff06") / "s"
    st.init_store(root)
    rng = np.random.default_rng(7)
    data = rng.integers(-1000, 2000, size=(24, 70, 90), dtype=np.int16)
    affine = _oblique_affine()
    info = st.write_volume(root, "v1", data, affine, chunk=32)
    labels = np.zeros(data.shape, np.uint8)
    labels[5:15, 10:40, 20:70] = 1
    labels[8:12, 20:30, 30:40] = 2
    st.write_label(root, "v1", "seg", labels)
    return root, affine, info


def _attrs(path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


# ----------------------------------------------------------------------------- schemas


def _validator(version: str, schema: str) -> Draft202012Validator:
    """A validator for one of the schemas ngff-zarr ships (``ngff_zarr/spec/<version>``).

    They refer to one another by absolute ``https://ngff.openmicroscopy.org/...`` ids; every
    shipped file is registered under its ``$id``, and any other reference fails instead of
    being fetched."""
    folder = files("ngff_zarr") / "spec" / version / "schemas"
    resources = []
    for entry in folder.iterdir():
        if entry.name.endswith(".schema"):
            contents = json.loads(entry.read_text())
            resources.append((contents["$id"], Resource.from_contents(contents, default_specification=DRAFT202012)))

    def offline(uri: str):
        raise NoSuchResource(ref=uri)

    registry = Registry(retrieve=offline).with_resources(resources)
    main = json.loads((folder / schema).read_text())
    return Draft202012Validator(main, registry=registry)


def test_schemas_are_the_released_0_6():
    from importlib.metadata import version

    schema = json.loads((files("ngff_zarr") / "spec" / "0.6" / "schemas" / "_version.schema").read_text())
    assert "0.6" in schema["enum"], f"ngff-zarr {version('ngff-zarr')} ships no released 0.6 schema"


def test_volume_metadata_is_valid_ngff_0_6(written):
    root, _, _ = written
    attrs = _attrs(st.volume_path(root, "v1"))
    assert attrs["ome"]["version"] == "0.6"
    _validator("0.6", "strict_image.schema").validate(attrs)
    entry = attrs["ome"]["multiscales"][0]
    _validator("0.6", "strict_coordinate_systems.schema").validate(entry["coordinateSystems"])
    # What the schema leaves to the text: each level maps its own array into the intrinsic
    # system, the last one listed, and the multiscale transform leads from it to another.
    intrinsic = entry["coordinateSystems"][-1]["name"]
    for dataset in entry["datasets"]:
        (t,) = dataset["coordinateTransformations"]
        assert (t["input"], t["output"]) == ({"path": dataset["path"]}, {"name": intrinsic})
    (to_world,) = entry["coordinateTransformations"]
    assert to_world["input"] == {"name": intrinsic} and to_world["output"]["name"] != intrinsic
    assert np.asarray(to_world["affine"]).shape == (3, 4)


def test_label_metadata_is_valid_ngff_0_6(written):
    root, _, _ = written
    label_dir = st.volume_path(root, "v1") / "labels"
    attrs = _attrs(label_dir / "seg")
    # A label image is a multiscale image and a label: both schemas apply.
    _validator("0.6", "strict_image.schema").validate(attrs)
    _validator("0.6", "strict_label.schema").validate(attrs)
    assert [c["label-value"] for c in attrs["ome"]["image-label"]["colors"]] == [1, 2]
    assert _attrs(label_dir)["ome"] == {"version": "0.6", "labels": ["seg"]}


def test_validation_is_not_vacuous(written):
    """The 0.6 validator refuses what 0.6 does not allow: the 0.5 layout (no coordinate
    systems), a dataset transform that is not a scale, a transform without its output."""
    root, _, _ = written
    attrs = _attrs(st.volume_path(root, "v1"))
    validator = _validator("0.6", "image.schema")
    legacy = json.loads(json.dumps(attrs))
    del legacy["ome"]["multiscales"][0]["coordinateSystems"]
    affine_as_level = json.loads(json.dumps(attrs))
    affine_as_level["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"] = \
        attrs["ome"]["multiscales"][0]["coordinateTransformations"]
    no_output = json.loads(json.dumps(attrs))
    del no_output["ome"]["multiscales"][0]["coordinateTransformations"][0]["output"]
    for bad in (legacy, affine_as_level, no_output):
        with pytest.raises(ValidationError):
            validator.validate(bad)


@pytest.mark.parametrize("shape,kwargs", [((3, 6, 40, 40), {"time_step": 2.0}),
                                          ((3, 6, 40, 40), {"channels": "RGB"})])
def test_four_d_volumes_are_valid_ngff_0_6(tmp_path, shape, kwargs):
    st.init_store(tmp_path / "s")
    data = np.zeros(shape, np.uint8)
    st.write_volume(tmp_path / "s", "v", data, _oblique_affine(), **kwargs)
    attrs = _attrs(st.volume_path(tmp_path / "s", "v"))
    _validator("0.6", "strict_image.schema").validate(attrs)
    entry = attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in entry["coordinateSystems"][-1]["axes"]][0] == ("c" if "channels" in kwargs else "t")
    matrix = np.asarray(entry["coordinateTransformations"][0]["affine"])
    assert matrix.shape == (4, 5)  # M x (N+1), the extra axis passed through unchanged
    np.testing.assert_array_equal(matrix[0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(matrix[1:, 0], 0)


def test_empty_label_leaves_out_empty_colour_lists(tmp_path):
    st.init_store(tmp_path / "s")
    st.write_volume(tmp_path / "s", "v", np.zeros((4, 16, 16), np.int16), _oblique_affine())
    st.write_label(tmp_path / "s", "v", "nothing", np.zeros((4, 16, 16), np.uint8))
    attrs = _attrs(st.volume_path(tmp_path / "s", "v") / "labels" / "nothing")
    _validator("0.6", "strict_image.schema").validate(attrs)
    _validator("0.6", "label.schema").validate(attrs)
    assert "colors" not in attrs["ome"]["image-label"]


# ----------------------------------------------------------------------------- another reader


def _affine_read_by_ngff_zarr(path, level: int) -> np.ndarray:
    """The index (x, y, z) -> RAS affine of one level, as ngff-zarr reads the 0.6 metadata:
    its own parser gives the level's scale and translation and the multiscale transform, and
    its ITK bridge turns that transform into ITK's (x, y, z) matrix and offset."""
    import ngff_zarr
    from ngff_zarr.ngff_transform_to_itk_transform import ngff_transform_to_itk_transform
    from ngff_zarr.v06.zarr_metadata import Affine, Metadata

    multiscales = ngff_zarr.from_ome_zarr(str(path), validate=True)
    assert isinstance(multiscales.metadata, Metadata), "not read as OME-Zarr 0.6"
    (to_world,) = multiscales.metadata.coordinateTransformations
    assert isinstance(to_world, Affine)
    assert (to_world.input.name, to_world.output.name) == ("intrinsic", "RAS")
    # The levels map into the system the affine leaves, so the two compose.
    assert multiscales.metadata.intrinsic_coordinate_system.name == to_world.input.name
    image = multiscales.images[level]
    (itk,) = ngff_transform_to_itk_transform(to_world, image.dims)
    matrix = np.asarray(itk.parameters[:9]).reshape(3, 3)
    centre = np.asarray(itk.fixedParameters)
    world = np.eye(4)
    world[:3, :3] = matrix
    world[:3, 3] = np.asarray(itk.parameters[9:]) + centre - matrix @ centre
    grid = np.eye(4)  # array index (x, y, z) -> intrinsic mm (x, y, z)
    grid[:3, :3] = np.diag([image.scale[a] for a in "xyz"])
    grid[:3, 3] = [image.translation[a] for a in "xyz"]
    return world @ grid


def test_ngff_zarr_reads_the_same_affine(written):
    root, affine, info = written
    path = st.volume_path(root, "v1")
    assert info.levels == 3
    for level in range(info.levels):
        ours = st.open_volume(root, "v1", level=level).affine
        np.testing.assert_allclose(_affine_read_by_ngff_zarr(path, level), ours, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_affine_read_by_ngff_zarr(path, 0), affine, rtol=0, atol=1e-6)
    # The label carries the same geometry.
    np.testing.assert_allclose(_affine_read_by_ngff_zarr(path / "labels" / "seg", 1),
                               st.open_volume(root, "v1", level=1).affine, rtol=0, atol=1e-6)


def test_ngff_zarr_reads_the_voxels_and_world_orientation(written):
    import ngff_zarr

    root, _, _ = written
    multiscales = ngff_zarr.from_ome_zarr(str(st.volume_path(root, "v1")))
    np.testing.assert_array_equal(np.asarray(multiscales.images[1].data),
                                  st.open_volume(root, "v1", level=1).array[...])
    world = next(cs for cs in multiscales.metadata.coordinateSystems if cs.name == "RAS")
    assert {a.name: a.orientation["value"] for a in world.axes} == {
        "x": "left-to-right", "y": "posterior-to-anterior", "z": "inferior-to-superior"}
    assert all(a.unit == "millimeter" for a in world.axes)


def test_voxel_centres_land_where_the_affine_puts_them(written):
    """The JSON alone, read as the spec says (parameters in axis order, the affine as an
    N x (N+1) block applied to column vectors), maps a voxel of a coarse level to the world
    point voxelflow's affine gives."""
    root, _, _ = written
    entry = _attrs(st.volume_path(root, "v1"))["ome"]["multiscales"][0]
    level = entry["datasets"][2]["coordinateTransformations"][0]
    scale, translation = (t[t["type"]] for t in level["transformations"])
    block = np.asarray(entry["coordinateTransformations"][0]["affine"])
    index_zyx = np.array([5.0, 7.0, 3.0])
    world_zyx = block[:, :3] @ (np.asarray(scale) * index_zyx + translation) + block[:, 3]
    expected = st.open_volume(root, "v1", level=2).affine @ np.r_[index_zyx[::-1], 1.0]
    np.testing.assert_allclose(world_zyx[::-1], expected[:3], atol=1e-9)


# ----------------------------------------------------------------------------- stores written as 0.5


def _rewrite_as_0_5(group_path) -> None:
    """Give a written volume or label the attributes voxelflow wrote before 0.6: version 0.5,
    ``axes`` and ``[scale, translation]`` per level, no coordinate systems."""
    meta = json.loads((group_path / "zarr.json").read_text())
    ome = meta["attributes"]["ome"]
    entry = ome["multiscales"][0]
    datasets = []
    for dataset in entry["datasets"]:
        (t,) = dataset["coordinateTransformations"]
        parts = t["transformations"] if t["type"] == "sequence" else \
            [t, {"type": "translation", "translation": [0.0] * len(t["scale"])}]
        datasets.append({"path": dataset["path"], "coordinateTransformations": [
            {"type": "scale", "scale": parts[0]["scale"]},
            {"type": "translation", "translation": parts[1]["translation"]}]})
    old = {"name": entry["name"], "axes": entry["axes"], "datasets": datasets, "type": entry["type"]}
    meta["attributes"]["ome"] = {"version": "0.5", "multiscales": [old]}
    if "image-label" in ome:
        meta["attributes"]["ome"]["image-label"] = ome["image-label"] | {"version": "0.5"}
    (group_path / "zarr.json").write_text(json.dumps(meta))


@pytest.fixture
def legacy(tmp_path):
    root = tmp_path / "s"
    st.init_store(root)
    data = np.arange(12 * 64 * 72, dtype=np.int16).reshape(12, 64, 72)
    affine = _oblique_affine()
    st.write_volume(root, "old", data, affine)
    st.write_label(root, "old", "seg", (data % 3).astype(np.uint8))
    path = st.volume_path(root, "old")
    _rewrite_as_0_5(path)
    _rewrite_as_0_5(path / "labels" / "seg")
    (path / "labels" / "zarr.json").write_text(json.dumps(
        {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5", "labels": ["seg"]}}}))
    _validator("0.5", "image.schema").validate(_attrs(path))
    return root, data, affine


def test_volume_written_as_0_5_opens_with_its_affine(legacy):
    root, data, affine = legacy
    vol = st.open_volume(root, "old")
    np.testing.assert_array_equal(vol.array[...], data)
    np.testing.assert_allclose(vol.affine, affine, rtol=0, atol=1e-12)
    coarse = st.open_volume(root, "old", level=1)
    assert coarse.array.shape == (12, 32, 36)  # 2.5 mm slices are not halved first
    np.testing.assert_allclose(coarse.affine, level_affine(affine, (2, 2, 1)), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(st.open_label(root, "old", "seg")[...], (data % 3).astype(np.uint8))
    assert [d["path"] for d in st.list_levels(st.zarr.open_group(str(st.volume_path(root, "old")), mode="r"))][:2] \
        == ["s0", "s1"]


def test_label_added_to_a_0_5_volume_stays_0_5(legacy):
    """One hierarchy, one NGFF version: a new label of an old volume is written as 0.5."""
    root, data, _ = legacy
    st.write_label(root, "old", "new", (data > 100).astype(np.uint8))
    labels = st.volume_path(root, "old") / "labels"
    attrs = _attrs(labels / "new")
    assert attrs["ome"]["version"] == "0.5"
    _validator("0.5", "strict_image.schema").validate(attrs)
    _validator("0.5", "strict_label.schema").validate(attrs)
    assert _attrs(labels)["ome"] == {"version": "0.5", "labels": ["new", "seg"]}
    np.testing.assert_array_equal(st.open_label(root, "old", "new", level=1)[...],
                                  st.downsample_labels((data > 100).astype(np.uint8), (1, 2, 2)))


def test_unknown_ngff_version_is_refused(legacy):
    root, _, _ = legacy
    meta_path = st.volume_path(root, "old") / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["ome"]["version"] = "0.4"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UnsupportedDataError, match=r"OME-Zarr version '0.4'; voxelflow reads \('0.6', '0.5'\)"):
        st.open_volume(root, "old")


def test_level_scale_reads_both_layouts():
    old = {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [2.5, 1.4, 1.4]},
                                                       {"type": "translation", "translation": [0, 0.35, 0.35]}]}
    new = {"path": "s1", "coordinateTransformations": [{"type": "sequence", "transformations": [
        {"type": "scale", "scale": [2.5, 1.4, 1.4]}, {"type": "translation", "translation": [0, 0.35, 0.35]}],
        "input": {"path": "s1"}, "output": {"name": "intrinsic"}}]}
    assert ngff.level_scale(old) == ngff.level_scale(new) == [2.5, 1.4, 1.4]
