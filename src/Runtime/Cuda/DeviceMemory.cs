namespace KernelLM.Runtime.Cuda;

/// <summary>Allocation with the engine's out-of-memory error: which tensor, how big, and what the caller already holds.</summary>
public static class DeviceMemory
{
    public static DeviceTensor Allocate(CudaDevice device, string name, DType dtype, int[] shape, string context)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(shape);
        try
        {
            return device.Allocate(name, dtype, shape);
        }
        catch (CudaException error) when (error.ErrorName == "CUDA_ERROR_OUT_OF_MEMORY")
        {
            long bytes = dtype.SizeOf();
            foreach (int dimension in shape)
            {
                bytes *= dimension;
            }
            throw new DeviceOutOfMemoryException(
                $"out of device memory: '{name}' [{string.Join(", ", shape)}] {dtype} ({bytes:N0} bytes) does not fit on {device.Name} " +
                $"({device.Backend.TotalMemoryBytes:N0} bytes) {context}", error);
        }
    }
}
