"""Optics read from real OME-TIFF, ImageJ TIFF and OME-Zarr files (io.optics_metadata)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_mpt_deblur.io.images import ImageReadError, read_image
from napari_mpt_deblur.io.optics_metadata import FoundValue, optics_from_files, read_optics_metadata

PLANE = np.arange(64, dtype=np.uint16).reshape(8, 8)


def ome_xml(*, pixels: str = 'PhysicalSizeX="0.645" PhysicalSizeY="0.645"', channel: str = 'EmissionWavelength="461"',
            instrument: str = "", settings: str = "") -> str:
    """A complete one-plane OME-XML document (namespace of the 2016-06 schema)."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
        f"{instrument}"
        '<Image ID="Image:0" Name="cells">'
        f"{settings}"
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="8" SizeY="8" SizeC="1" SizeZ="1" '
        f'SizeT="1" {pixels}>'
        f'<Channel ID="Channel:0:0" SamplesPerPixel="1" {channel}/>'
        '<TiffData IFD="0" PlaneCount="1"/>'
        "</Pixels></Image></OME>"
    )


INSTRUMENT = (
    '<Instrument ID="Instrument:0">'
    '<Objective ID="Objective:0:0" LensNA="0.3" Immersion="Air" NominalMagnification="10"/>'
    '<Objective ID="Objective:0:1" LensNA="1.4" Immersion="Oil" NominalMagnification="60"/>'
    "</Instrument>"
)


def write_ome(path, xml: str):
    tifffile.imwrite(path, PLANE, description=xml, metadata=None)
    return path


def test_ome_tiff_objective_immersion_emission_pixel(tmp_path):
    # The image references the second objective (60x/1.4 oil), not the first one of the instrument.
    path = write_ome(tmp_path / "cells.ome.tif", ome_xml(
        instrument=INSTRUMENT, settings='<ObjectiveSettings ID="Objective:0:1"/>'))
    found = read_optics_metadata(path)
    assert set(found) == {"na", "immersion_index", "wavelength_um", "pixel_um"}
    assert found["na"] == FoundValue(1.4, "OME-TIFF metadata of cells.ome.tif (Objective LensNA)")
    assert found["immersion_index"] == FoundValue(1.518, "OME-TIFF metadata of cells.ome.tif (Objective Immersion Oil)")
    assert found["wavelength_um"].value == pytest.approx(0.461)
    assert found["wavelength_um"].source == "OME-TIFF metadata of cells.ome.tif (Channel EmissionWavelength 461 nm)"
    assert found["pixel_um"].value == pytest.approx(0.645)
    assert found["pixel_um"].source == "OME-TIFF metadata of cells.ome.tif (Pixels PhysicalSizeX 0.645 µm)"
    # The file is also a readable image for the rest of the pipeline.
    assert read_image(path).shape == (8, 8)


def test_ome_tiff_first_objective_without_settings_and_unknown_immersion(tmp_path):
    instrument = ('<Instrument ID="Instrument:0">'
                  '<Objective ID="Objective:0:0" LensNA="0.45" Immersion="Multi"/></Instrument>')
    found = read_optics_metadata(write_ome(tmp_path / "a.ome.tif", ome_xml(instrument=instrument, channel="")))
    assert found["na"].value == 0.45
    assert "immersion_index" not in found  # "Multi" names no single medium: skipped, not guessed
    assert "wavelength_um" not in found


def test_ome_tiff_units_converted(tmp_path):
    # Written by tifffile's own OME writer: nm pixel size, emission in um, two channels (the first wins).
    path = tmp_path / "nm.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 8, 8), np.uint16), metadata={
        "axes": "CYX", "PhysicalSizeX": 645, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 700, "PhysicalSizeYUnit": "nm",
        "Channel": {"EmissionWavelength": [0.52, 0.61], "EmissionWavelengthUnit": ["µm", "µm"]}})
    found = read_optics_metadata(path)
    assert found["pixel_um"].value == pytest.approx(0.645)
    assert found["pixel_um"].source == ("OME-TIFF metadata of nm.ome.tif (Pixels PhysicalSizeX 645 nm; "
                                        "PhysicalSizeY 700 nm differs, X used)")
    assert found["wavelength_um"].value == pytest.approx(0.52)
    assert set(found) == {"pixel_um", "wavelength_um"}


def test_objective_settings_refractive_index_wins_over_immersion_name(tmp_path):
    path = write_ome(tmp_path / "glyc.ome.tif", ome_xml(
        instrument=INSTRUMENT, settings='<ObjectiveSettings ID="Objective:0:1" RefractiveIndex="1.46"/>'))
    found = read_optics_metadata(path)
    assert found["immersion_index"] == FoundValue(
        1.46, "OME-TIFF metadata of glyc.ome.tif (ObjectiveSettings RefractiveIndex)")
    assert found["na"].value == 1.4


def test_imagej_tiff_pixel_size_from_resolution(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 8, 8), np.uint16), imagej=True, resolution=(1 / 0.325, 1 / 0.325),
                     metadata={"axes": "ZYX", "unit": "micron"})
    found = read_optics_metadata(path)
    assert set(found) == {"pixel_um"}
    assert found["pixel_um"].value == pytest.approx(0.325, rel=1e-6)
    assert found["pixel_um"].source.startswith("ImageJ metadata of stack.tif (XResolution 3.07692 pixels per micron")

    nm = tmp_path / "nm.tif"
    tifffile.imwrite(nm, PLANE, imagej=True, resolution=(1 / 110.0, 1 / 110.0), metadata={"unit": "nm"})
    assert read_optics_metadata(nm)["pixel_um"].value == pytest.approx(0.110, rel=1e-6)


def test_plain_tiff_dpi_is_not_a_pixel_size(tmp_path):
    for unit in ("inch", "centimeter"):
        path = tmp_path / f"scan_{unit}.tif"
        tifffile.imwrite(path, PLANE, resolution=(72, 72), resolutionunit=unit)
        assert read_optics_metadata(path) == {}
    no_unit = tmp_path / "ij_pixels.tif"  # ImageJ file calibrated in "pixel": says nothing
    tifffile.imwrite(no_unit, PLANE, imagej=True, resolution=(1.0, 1.0), metadata={"unit": "pixel"})
    assert read_optics_metadata(no_unit) == {}


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_ome_zarr_pixel_size(tmp_path, version):
    import zarr

    path = tmp_path / f"img{version}.zarr"
    axes = [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "nanometer"}]
    ms = {"axes": axes, "name": "img",
          "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 325.0]}]},
                       {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 1.0, 650.0]}]}],
          "coordinateTransformations": [{"type": "scale", "scale": [1, 2.0, 2.0]}]}
    if version == "0.4":
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        group.attrs["multiscales"] = [{**ms, "version": "0.4"}]
    else:
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        group.attrs["ome"] = {"version": "0.5", "multiscales": [ms],
                              "omero": {"channels": [{"label": "DAPI", "color": "0000FF"}]}}
    group.create_array("0", shape=(1, 8, 8), dtype="uint16")
    found = read_optics_metadata(path)
    assert set(found) == {"pixel_um"}  # no NA, wavelength or immersion invented from omero channels
    assert found["pixel_um"].value == pytest.approx(0.650)  # 325 nm x multiscales-level scale 2
    assert found["pixel_um"].source == (f"OME-Zarr {version} metadata of {path.name} "
                                        "(multiscales x scale 325 nanometer x 2)")


def test_merge_agreement_and_first_file_wins(tmp_path):
    a = write_ome(tmp_path / "a.ome.tif",
                  ome_xml(instrument=INSTRUMENT, settings='<ObjectiveSettings ID="Objective:0:1"/>'))
    # b states the same pixel size within 1 % (0.648 vs 0.645) and nothing else.
    b = tmp_path / "b.tif"
    tifffile.imwrite(b, PLANE, imagej=True, resolution=(1 / 0.648, 1 / 0.648), metadata={"unit": "um"})
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, PLANE)
    found = optics_from_files([plain, b, a])
    assert list(found) == ["na", "immersion_index", "wavelength_um", "pixel_um"]
    assert found["pixel_um"].value == pytest.approx(0.648)  # b comes before a
    assert found["pixel_um"].source.startswith("ImageJ metadata of b.tif")
    assert found["na"].source == "OME-TIFF metadata of a.ome.tif (Objective LensNA)"
    assert optics_from_files([]) == {}


def test_merge_disagreement_names_both_files(tmp_path):
    a = write_ome(tmp_path / "a.ome.tif", ome_xml())
    b = write_ome(tmp_path / "b.ome.tif", ome_xml(pixels='PhysicalSizeX="0.325" PhysicalSizeY="0.325"'))
    with pytest.raises(ValueError) as err:
        optics_from_files([a, b])
    message = str(err.value)
    assert "pixel_um" in message and str(a) in message and str(b) in message
    assert "0.645" in message and "0.325" in message


def test_unreadable_files_raise_the_image_readers_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    garbage = tmp_path / "broken.tif"
    garbage.write_bytes(b"this is not a TIFF file at all")
    not_zarr = tmp_path / "empty.zarr"
    not_zarr.mkdir()
    for path, kind in [(text, ValueError), (garbage, ImageReadError), (not_zarr, ValueError),
                       (tmp_path / "missing.tif", FileNotFoundError)]:
        with pytest.raises(kind) as ours:
            read_optics_metadata(path)
        with pytest.raises(kind) as theirs:
            read_image(path)
        assert type(ours.value) is type(theirs.value)
        assert str(ours.value) == str(theirs.value) and str(path) in str(ours.value)
