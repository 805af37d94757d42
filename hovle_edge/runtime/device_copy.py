"""Rows of a KV cache buffer [B, kv_heads, capacity, head_dim] in device memory, copied with one
strided copy (cudaMemcpy2DAsync: one row of B * kv_heads per (batch, head)) through cuda-python,
which is imported only when a copy is made. Shared by the TensorRT backend and ONNX Runtime on CUDA."""

from __future__ import annotations


def _check(result):
    from cuda.bindings import runtime as cudart

    error = result[0] if isinstance(result, tuple) else result
    if error != cudart.cudaError_t.cudaSuccess:
        from hovle_edge.runtime.backends import BackendError

        raise BackendError(f"CUDA error {error} while copying KV cache rows")


def copy_rows(buffer: int, buffer_shape: tuple, rows: int, rows_shape: tuple, start: int, itemsize: int,
              stream=0, kind: str = "device") -> None:
    """Write `rows` [B, kvh, n, d] (a device pointer, or a host pointer with kind="host") into slots
    start..start+n-1 of `buffer`."""
    from cuda.bindings import runtime as cudart

    batch, heads, capacity, head_dim = buffer_shape
    n = rows_shape[2]
    row_bytes = head_dim * itemsize
    copy = (cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice if kind == "device"
            else cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
    _check(cudart.cudaMemcpy2DAsync(buffer + start * row_bytes, capacity * row_bytes, rows, n * row_bytes,
                                    n * row_bytes, batch * heads, copy, stream))


def read_rows(buffer: int, buffer_shape: tuple, host: int, length: int, itemsize: int, stream=0) -> None:
    """The first `length` slots of `buffer` into a host array [B, kvh, length, d] at pointer `host`."""
    from cuda.bindings import runtime as cudart

    batch, heads, capacity, head_dim = buffer_shape
    row_bytes = head_dim * itemsize
    _check(cudart.cudaMemcpy2DAsync(host, length * row_bytes, buffer, capacity * row_bytes, length * row_bytes,
                                    batch * heads, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
    _check(cudart.cudaStreamSynchronize(stream))
