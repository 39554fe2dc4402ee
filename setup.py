"""Build of the native CPU kernels `elastic_ops._C`.

pybind11's setuptools helpers compile one file after another with no dependency tracking, so this
file writes a small ninja file and lets ninja compile in parallel and incrementally, the way
torch's BuildExtension does. torch is not needed to build: tensors reach C++ as a data pointer,
a shape and element strides.

A failed compile must not make the package unusable: it is reported clearly and the package falls
back to its PyTorch reference. Set ELASTIC_OPS_REQUIRE_NATIVE=1 to turn that into a hard error.
"""
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"

CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp-simd", "-Wall", "-Wno-unused-function"]
LDFLAGS = ["-shared", "-pthread"]


def _ninja_executable():
    try:
        import ninja

        return str(Path(ninja.BIN_DIR) / "ninja")
    except ImportError:
        found = shutil.which("ninja")
        if found is None:
            raise RuntimeError("ninja is not installed (pip install ninja)")
        return found


def _write_build_file(build_dir: Path, sources, output: Path, include_dirs):
    cxx = os.environ.get("CXX", "c++")
    cflags = CXXFLAGS + [f"-I{d}" for d in include_dirs]
    if sys.platform == "darwin":
        ldflags = LDFLAGS + ["-undefined", "dynamic_lookup"]
    else:
        ldflags = LDFLAGS
    lines = [
        "ninja_required_version = 1.3",
        f"cxx = {cxx}",
        f"cflags = {' '.join(shlex.quote(f) for f in cflags)}",
        f"ldflags = {' '.join(ldflags)}",
        "",
        "rule compile",
        "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "",
        "rule link",
        "  command = $cxx $in $ldflags -o $out",
        "  description = LINK $out",
        "",
    ]
    objects = []
    for src in sources:
        obj = build_dir / (Path(src).stem + ".o")
        objects.append(obj)
        lines.append(f"build {obj}: compile {src}")
    lines.append(f"build {output}: link {' '.join(str(o) for o in objects)}")
    lines.append(f"default {output}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")


class NinjaBuildExt(build_ext):
    def build_extension(self, ext):
        try:
            self._build_with_ninja(ext)
        except Exception as err:  # noqa: BLE001 - any compile failure degrades to the reference backend
            if os.environ.get("ELASTIC_OPS_REQUIRE_NATIVE") == "1":
                raise
            bar = "=" * 78
            print(
                f"\n{bar}\nelastic-ops: the native CPU kernels ({ext.name}) failed to build:\n  {err}\n"
                "The package will install and run on its PyTorch reference (and Triton where available).\n"
                "Fix the compiler error above and reinstall to get the native kernels;\n"
                f"set ELASTIC_OPS_REQUIRE_NATIVE=1 to make this failure fatal.\n{bar}\n",
                file=sys.stderr,
            )

    def _build_with_ninja(self, ext):
        import pybind11

        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        include_dirs = [sysconfig.get_paths()["include"], pybind11.get_include(), str(CSRC)]
        _write_build_file(build_dir, [str(Path(s).resolve()) for s in ext.sources], output, include_dirs)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run([_ninja_executable(), "-C", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[Extension("elastic_ops._C", sources=sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")))],
    cmdclass={"build_ext": NinjaBuildExt},
)
