"""Package layout that pyproject.toml cannot express: src/ and analysis/ packages plus the
top-level conf/ and sweeps/ folders mapped into the wheel as ptqscale.conf(.sweep)."""

from setuptools import find_packages, setup

packages = find_packages("src") + find_packages("analysis")
package_dir = {p: f"src/{p.replace('.', '/')}" for p in find_packages("src")}
package_dir |= {p: f"analysis/{p.replace('.', '/')}" for p in find_packages("analysis")}
package_dir |= {"ptqscale.conf": "conf", "ptqscale.conf.sweep": "sweeps"}

setup(packages=packages + ["ptqscale.conf", "ptqscale.conf.sweep"], package_dir=package_dir)
