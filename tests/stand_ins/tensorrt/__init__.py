"""A recording stand-in for the TensorRT Python API, just enough for Polygraphy's build path."""
import enum
import json
import os

__version__ = os.environ.get("FAKE_TRT_VERSION", "10.8.0.43")
CALLS = []


def _log(*event):
    CALLS.append([f"{type(e).__name__}.{e.name}" if isinstance(e, enum.Enum) else e for e in event])


class BuilderFlag(enum.IntEnum):
    FP16 = 0
    TF32 = 1
    REFIT = 2


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class MemoryPoolType(enum.IntEnum):
    WORKSPACE = 0


class DeviceType(enum.IntEnum):
    GPU = 0
    DLA = 1


class ProfilingVerbosity(enum.IntEnum):
    DETAILED = 2


class ILogger:
    def __init__(self):
        pass


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


def init_libnvinfer_plugins(logger, namespace):
    return True


class _Input:
    def __init__(self, name, shape):
        self.name, self.shape, self.is_shape_tensor, self.dtype = name, shape, False, "FLOAT"


class Network:
    def __init__(self, flags):
        self.flags = flags
        self.inputs = []

    num_inputs = property(lambda self: len(self.inputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_flag(self, flag):
        return bool(self.flags & (1 << int(flag)))

    def __iter__(self):
        return iter(())


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        import onnx

        _log("parse_from_file", os.path.basename(path))
        for tensor in onnx.load(path).graph.input:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.type.tensor_type.shape.dim]
            self.network.inputs.append(_Input(tensor.name, tuple(dims)))
        return True


class Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, low, opt, high):
        self.shapes[name] = [list(low), list(opt), list(high)]

    def __bool__(self):
        return True


class TimingCache:
    def __init__(self, data):
        self.data = bytes(data)

    def combine(self, other, ignore_mismatch):
        self.data += b"+" + other.data
        return True

    def serialize(self):
        return _Buffer(self.data or b"timings")


class _Buffer(bytes):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Config:
    DLA_core = -1
    default_device_type = DeviceType.GPU

    def __init__(self):
        self.flags = {BuilderFlag.TF32}          # TensorRT's default: TF32 on
        self.pools, self.profiles, self.cache = {}, [], None

    def set_flag(self, flag):
        _log("set_flag", flag)
        self.flags.add(flag)

    def clear_flag(self, flag):
        _log("clear_flag", flag)
        self.flags.discard(flag)

    def get_flag(self, flag):
        return flag in self.flags

    def set_memory_pool_limit(self, pool, size):
        _log("set_memory_pool_limit", pool, size)
        self.pools[pool] = size

    def get_memory_pool_limit(self, pool):
        return self.pools.get(pool, 0)

    def add_optimization_profile(self, profile):
        _log("add_optimization_profile", profile.shapes)
        self.profiles.append(profile)

    num_optimization_profiles = property(lambda self: len(self.profiles))

    def create_timing_cache(self, data):
        return TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        _log("set_timing_cache", cache.data.decode(), ignore_mismatch)
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Builder:
    def __init__(self, logger):
        pass

    def create_network(self, flags=0):
        _log("create_network", flags)
        return Network(flags)

    def create_builder_config(self):
        return Config()

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        _log("build", sorted(f.name for f in config.flags), network.get_flag(NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        with open(os.environ["FAKE_TRT_CALLS"], "w") as handle:
            json.dump(CALLS, handle)
        return b"serialized engine"
