"""The SHA-256 of weights files (the dilated ResNet's ImageNet weights load through ``mtl_keras.models.resnet``)."""

import hashlib


def file_sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
