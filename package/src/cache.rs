//! The output cache: inputs with their digests, hit or miss.
