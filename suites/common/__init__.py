"""What every suite needs that is not quantization: asset fetching, progress, metrics files."""
