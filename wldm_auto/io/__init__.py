"""Image and file I/O shared by every stage."""
from wldm_auto.io.files import atomic_path, hash_data, hash_file, read_json, save_npy, write_json
from wldm_auto.io.geometry import Geometry
from wldm_auto.io.images import (
    FILE_ENDINGS,
    ImageReadError,
    check_image,
    file_ending,
    image_from_array,
    is_dicom_folder,
    read_image,
    strip_ending,
    write_image,
)

__all__ = [
    "FILE_ENDINGS", "Geometry", "ImageReadError", "atomic_path", "check_image", "file_ending",
    "hash_data", "hash_file", "image_from_array", "is_dicom_folder", "read_image", "read_json",
    "save_npy", "strip_ending", "write_image", "write_json",
]
