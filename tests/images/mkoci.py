#!/usr/bin/env python3
"""Builds a single-layer OCI image archive that `ctr image import` (containerd 1.6) accepts.

    mkoci.py --name localhost/x:1 [--cmd CMD] [--entrypoint CMD] [--env K=V]...
             [--workdir DIR] [--label K=V]... [--file SRC=/IMAGE/PATH]...
             [SRC_DIR] OUT.tar

The layer holds SRC_DIR (its contents become the image's /) plus every --file, each
copied to the given absolute path inside the image (missing parent directories are
created, mode 0755). At least one of SRC_DIR or --file is needed.

--cmd and --entrypoint take either a JSON array (`'["/bin/sh","-c","echo hi"]'`) or a
shell-like string split with shlex (`'/bin/sh -c "echo hi"'`). --env may repeat; without a
PATH entry the config gets the usual default PATH.

The output is deterministic: files in sorted order, owner root:root (uid/gid 0), mtime 0,
gzip without name or timestamp. Layer data is streamed (64 KiB at a time) through tar,
gzip and SHA-256 into a temporary blob and then into the archive, so large or sparse files
(disk images) never sit in memory; holes are written as zeros and gzip squeezes them.

The archive is an OCI image layout in a plain tar:
    oci-layout, index.json, blobs/sha256/{layer,config,manifest}
index.json annotates the manifest with `io.containerd.image.name` (the full --name) and
`org.opencontainers.image.ref.name` (the tag), so `ctr image import OUT.tar` names the
image with no further flags.

Python 3 standard library only.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shlex
import stat
import sys
import tarfile
import tempfile

CHUNK = 64 * 1024
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


class Error(Exception):
    pass


class HashingWriter:
    """A write-only file object that hashes and counts what passes through to `inner`."""

    def __init__(self, inner):
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self):
        self.inner.flush()

    def digest(self):
        return "sha256:" + self.sha.hexdigest()


def parse_command(text, flag):
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise Error(f"{flag}: invalid JSON array: {e}") from e
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Error(f"{flag}: expected a JSON array of strings")
        return value
    try:
        return shlex.split(text)
    except ValueError as e:
        raise Error(f"{flag}: {e}") from e


def normalize(info):
    """Root-owned, timestamp 0: the same tree always gives the same layer."""
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def image_path(path):
    """'/disk/disk.qcow2' -> 'disk/disk.qcow2' (tar member names are relative)."""
    if not path.startswith("/"):
        raise Error(f"image path {path!r} must be absolute")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise Error(f"bad image path {path!r}")
    return "/".join(parts)


def collect(src_dir, files):
    """Returns the layer's entries as sorted [(member name, host path or None)].

    None marks a directory made up to hold a --file. Directory walking does not follow
    symlinks; --file sources are followed (a symlink to a disk image adds the image).
    """
    entries = {}
    if src_dir is not None:
        if not os.path.isdir(src_dir):
            raise Error(f"{src_dir}: not a directory")
        def fail(e):
            raise e

        for root, dirs, names in os.walk(src_dir, onerror=fail):
            dirs.sort()
            for name in dirs + sorted(names):
                host = os.path.join(root, name)
                member = os.path.relpath(host, src_dir).replace(os.sep, "/")
                entries[member] = (host, False)
    for src, dest in files:
        if not os.path.isfile(src):
            raise Error(f"{src}: not a regular file")
        member = image_path(dest)
        parts = member.split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]), (None, False))
        entries[member] = (src, True)
    if not entries:
        raise Error("the image would be empty: give SRC_DIR or --file")
    return sorted(entries.items(), key=lambda kv: kv[0].split("/"))


def write_layer(entries, out):
    """Streams the layer (tar -> sha256 -> gzip -> sha256 -> out). Returns (diff_id, digest, size)."""
    compressed = HashingWriter(out)
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
        plain = HashingWriter(gz)
        with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for member, (host, follow) in entries:
                if host is None:
                    info = tarfile.TarInfo(member)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(normalize(info))
                    continue
                if follow:
                    st = os.stat(host)
                    info = tarfile.TarInfo(member)
                    info.size = st.st_size
                    info.mode = stat.S_IMODE(st.st_mode)
                else:
                    info = tar.gettarinfo(host, arcname=member)
                    if info is None:  # a socket: tar cannot hold it
                        print(f"mkoci: skipping socket {host}", file=sys.stderr)
                        continue
                normalize(info)
                if info.isreg():
                    with open(host, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
        diff_id = plain.digest()
    return diff_id, compressed.digest(), compressed.size


def blob(data):
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def dumps(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def add_bytes(tar, name, data):
    info = normalize(tarfile.TarInfo(name))
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def build(args):
    name = args.name
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    files = []
    for spec in args.file:
        src, sep, dest = spec.partition("=")
        if not sep:
            raise Error(f"--file {spec!r}: expected SRC=/IMAGE/PATH")
        files.append((src, dest))
    env = list(args.env)
    for e in env:
        if "=" not in e:
            raise Error(f"--env {e!r}: expected KEY=VALUE")
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, DEFAULT_PATH)
    labels = {}
    for spec in args.label:
        k, sep, v = spec.partition("=")
        if not sep:
            raise Error(f"--label {spec!r}: expected KEY=VALUE")
        labels[k] = v

    entries = collect(args.src_dir, files)
    out_dir = os.path.dirname(os.path.abspath(args.out)) or "."
    with tempfile.TemporaryFile(dir=out_dir) as layer_file:
        diff_id, layer_digest, layer_size = write_layer(entries, layer_file)

        image_config = {"Env": env}
        if args.cmd is not None:
            image_config["Cmd"] = parse_command(args.cmd, "--cmd")
        if args.entrypoint is not None:
            image_config["Entrypoint"] = parse_command(args.entrypoint, "--entrypoint")
        if args.workdir:
            image_config["WorkingDir"] = args.workdir
        if labels:
            image_config["Labels"] = labels
        config_digest, config = blob(dumps({
            "architecture": "amd64",
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": image_config,
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "mkoci.py"}],
        }))
        manifest_digest, manifest = blob(dumps({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": MT_LAYER, "digest": layer_digest, "size": layer_size}],
        }))
        index = dumps({
            "schemaVersion": 2,
            "mediaType": MT_INDEX,
            "manifests": [{
                "mediaType": MT_MANIFEST,
                "digest": manifest_digest,
                "size": len(manifest),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": name,
                    "org.opencontainers.image.ref.name": tag,
                },
            }],
        })

        tmp_out = args.out + ".tmp"
        try:
            with tarfile.open(tmp_out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                add_bytes(tar, "oci-layout", dumps({"imageLayoutVersion": "1.0.0"}))
                add_bytes(tar, "index.json", index)
                for d in ("blobs", "blobs/sha256"):
                    info = normalize(tarfile.TarInfo(d))
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                layer_file.seek(0)
                info = normalize(tarfile.TarInfo("blobs/sha256/" + layer_digest.split(":")[1]))
                info.size = layer_size
                info.mode = 0o644
                tar.addfile(info, layer_file)
                add_bytes(tar, "blobs/sha256/" + config_digest.split(":")[1], config)
                add_bytes(tar, "blobs/sha256/" + manifest_digest.split(":")[1], manifest)
            os.replace(tmp_out, args.out)
        except BaseException:
            try:
                os.unlink(tmp_out)
            except FileNotFoundError:
                pass
            raise
    print(f"mkoci: {args.out}: {name} manifest {manifest_digest} layer {layer_size} bytes",
          file=sys.stderr)


def main(argv):
    p = argparse.ArgumentParser(
        prog="mkoci.py",
        description="Build a single-layer OCI image archive for `ctr image import`.")
    p.add_argument("--name", required=True, help="image name, e.g. localhost/busybox:1")
    p.add_argument("--cmd", help="Cmd: JSON array or shell-like string")
    p.add_argument("--entrypoint", help="Entrypoint: JSON array or shell-like string")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--workdir", help="WorkingDir")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument("--file", action="append", default=[], metavar="SRC=/IMAGE/PATH",
                   help="add host file SRC at /IMAGE/PATH (may repeat)")
    p.add_argument("paths", nargs="+", metavar="[SRC_DIR] OUT.tar")
    args = p.parse_args(argv)
    if len(args.paths) > 2:
        p.error("expected [SRC_DIR] OUT.tar")
    args.src_dir = args.paths[0] if len(args.paths) == 2 else None
    args.out = args.paths[-1]
    try:
        build(args)
    except (Error, OSError) as e:
        print(f"mkoci: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
