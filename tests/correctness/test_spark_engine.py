"""The Spark engine's own rules, checked without a session: Java is found or refused in
one line, and partition counts follow the study's lesson."""
import os
import stat

import pytest

pytest.importorskip("pyspark")

from engines import create_engine  # noqa: E402
from engines.spark import SparkEngine, find_java  # noqa: E402
from pipelines.errors import EngineUnavailable  # noqa: E402

pytestmark = pytest.mark.correctness


def fake_java(tmp_path, version_line):
    """A JAVA_HOME whose java prints `version_line` as `java -version` does (on stderr)."""
    java = tmp_path / "jdk" / "bin" / "java"
    java.parent.mkdir(parents=True)
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path / "jdk")


def test_missing_java_is_one_line_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk-here"))
    with pytest.raises(EngineUnavailable) as err:
        create_engine("spark", workers=1).start()
    message = str(err.value)
    assert "\n" not in message
    assert "Spark needs Java 17+ and found none" in message and "openjdk-17" in message


@pytest.mark.parametrize("line, major", [('openjdk version "11.0.2" 2019-01-15', 11),
                                         ('java version "1.8.0_392"', 8)])
def test_old_java_is_refused(tmp_path, monkeypatch, line, major):
    monkeypatch.setenv("JAVA_HOME", fake_java(tmp_path, line))
    with pytest.raises(EngineUnavailable, match=rf"Spark needs Java 17\+ but .*java is "
                                                rf"{major}: install"):
        find_java()


def test_new_java_is_accepted(tmp_path, monkeypatch):
    home = fake_java(tmp_path, 'openjdk version "21.0.4" 2024-07-16')
    monkeypatch.setenv("JAVA_HOME", home)
    assert find_java() == os.path.join(home, "bin", "java")


@pytest.mark.parametrize("cores, per_core, fragments, expected", [
    (2, 1, 32, 2),    # one partition per core: the study's best
    (8, 1, 3, 3),     # never more partitions than fragments
    (2, 1, 1, 1),     # a single fragment (the brain mask) is a single partition
    (4, 3, 100, 12),  # --spark-partitions-per-core 3
])
def test_partition_count(cores, per_core, fragments, expected):
    engine = SparkEngine(workers=cores, partitions_per_core=per_core)
    assert engine.partitions(fragments) == expected


def test_suite_options_reach_the_engine():
    engine = create_engine("spark", 3, spark_master="spark://h:7077",
                           spark_driver_memory="5g", spark_executor_memory="6g",
                           spark_partitions_per_core=2, dask_scheduler="tcp://elsewhere:8786",
                           tf_precision="float32")
    assert (engine.workers, engine.master, engine.driver_memory, engine.executor_memory,
            engine.partitions_per_core) == (3, "spark://h:7077", "5g", "6g", 2)
    conf = engine._conf()
    assert conf["spark.driver.memory"] == "5g" and conf["spark.executor.memory"] == "6g"
    assert conf["spark.python.worker.reuse"] == "true" and conf["spark.ui.enabled"] == "false"
