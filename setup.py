"""Package layout that pyproject.toml cannot express: src/ and analysis/ packages plus the
top-level conf/ and sweeps/ folders mapped into the wheel as ptqscale.conf(.sweep), and the
Hydra sweeper plugin under the namespace package hydra_plugins (no __init__.py there, so
find_packages skips it: Hydra discovers plugins by walking that namespace)."""

from setuptools import find_namespace_packages, find_packages, setup

plugins = find_namespace_packages("src", include=["hydra_plugins.*"])
packages = find_packages("src") + plugins + find_packages("analysis")
package_dir = {p: f"src/{p.replace('.', '/')}" for p in find_packages("src") + plugins}
package_dir |= {p: f"analysis/{p.replace('.', '/')}" for p in find_packages("analysis")}
package_dir |= {"ptqscale.conf": "conf", "ptqscale.conf.sweep": "sweeps"}

setup(packages=packages + ["ptqscale.conf", "ptqscale.conf.sweep"], package_dir=package_dir)
