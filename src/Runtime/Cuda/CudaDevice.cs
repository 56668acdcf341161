using System.Collections.Concurrent;

namespace KernelLM.Runtime.Cuda;

/// <summary>
/// A CUDA device (real or emulated) with its kernel library: every `kernels/*.cu` compiled (in parallel) and
/// loaded when the device is created, functions looked up by entry-point name. Owns the backend.
/// </summary>
public sealed class CudaDevice : IDisposable
{
    private readonly Dictionary<string, nint> _functions = new(StringComparer.Ordinal);
    private readonly List<IKernelModule> _modules = [];

    public CudaDevice(ICudaBackend backend, IEnumerable<KernelSource>? sources = null)
    {
        Backend = backend;
        var modules = new ConcurrentBag<IKernelModule>();
        try
        {
            Parallel.ForEach(sources ?? KernelSources.All, source => modules.Add(backend.LoadModule(source)));
        }
        catch (AggregateException error)
        {
            foreach (var module in modules)
            {
                module.Dispose();
            }
            // The first compile error (with its compiler log) is the useful one.
            throw error.InnerExceptions.OfType<CudaException>().FirstOrDefault() ?? (Exception)error;
        }
        foreach (var module in modules.OrderBy(m => m.FileName, StringComparer.Ordinal))
        {
            _modules.Add(module);
        }
        var declared = (sources ?? KernelSources.All).ToDictionary(s => s.FileName, s => s.EntryPoints, StringComparer.Ordinal);
        foreach (var module in _modules)
        {
            foreach (string name in declared[module.FileName])
            {
                _functions[name] = module.GetFunction(name);
            }
        }
    }

    public ICudaBackend Backend { get; }

    public string Name => Backend.DeviceName;

    /// <summary>Streaming multiprocessors (the emulated device reports a small number).</summary>
    public int MultiprocessorCount => Backend.MultiprocessorCount;

    public IReadOnlyCollection<string> FunctionNames => _functions.Keys;

    /// <summary>A kernel entry point by its extern "C" name (`rms_norm_bf16`).</summary>
    public nint Function(string name) =>
        _functions.TryGetValue(name, out nint function)
            ? function
            : throw new CudaException($"no kernel named '{name}' in the kernel library ({_functions.Count} entry points loaded)");

    public DeviceTensor Allocate(string name, DType dtype, params int[] shape) => new(this, name, dtype, shape);

    public void Synchronize(nint stream = 0) => Backend.Synchronize(stream);

    public void Dispose()
    {
        foreach (var module in _modules)
        {
            module.Dispose();
        }
        _modules.Clear();
        Backend.Dispose();
    }
}

/// <summary>
/// A named tensor in device memory, row-major; freed by Dispose (never left to the GC). Host transfers are
/// synchronous copies on the given stream.
/// </summary>
public sealed class DeviceTensor : IDisposable
{
    private readonly CudaDevice _device;
    private readonly bool _owner; // false for a view: the parent frees the memory

    internal DeviceTensor(CudaDevice device, string name, DType dtype, int[] shape)
    {
        if (!dtype.IsSupported() && dtype is not (DType.I32 or DType.F64 or DType.U64))
        {
            throw new ArgumentException($"tensor '{name}': dtype {dtype} is not a device dtype (F32, F16, BF16; I32, F64, U64 for ids, draws and counters)");
        }
        _device = device;
        Name = name;
        DType = dtype;
        Shape = shape;
        ElementCount = CountElements(shape);
        ByteLength = ElementCount * dtype.SizeOf();
        Address = device.Backend.Allocate(Math.Max(ByteLength, 1));
        _owner = true;
    }

    private DeviceTensor(DeviceTensor parent, string name, DType dtype, int[] shape, long byteOffset)
    {
        _device = parent._device;
        Name = name;
        DType = dtype;
        Shape = shape;
        ElementCount = CountElements(shape);
        ByteLength = ElementCount * dtype.SizeOf();
        // Aligned to the element size; ops whose kernels need more (the attention kernels' 16-byte loads) check it.
        if (byteOffset < 0 || byteOffset % dtype.SizeOf() != 0 || byteOffset + ByteLength > parent.ByteLength)
        {
            throw new ArgumentException($"view '{name}' {ShapeText} {dtype} at byte {byteOffset} does not lie aligned inside tensor '{parent.Name}' {parent.ShapeText} {parent.DType} ({parent.ByteLength} bytes)");
        }
        Address = parent.Address + (ulong)byteOffset;
    }

    /// <summary>A tensor over part of this one's memory (it owns nothing: disposing it frees nothing): a session's
    /// buffers seen with the current chunk's token count; tests put guard regions of sentinels after an op's output.</summary>
    public DeviceTensor View(string name, DType dtype, long byteOffset, params int[] shape) => new(this, name, dtype, shape, byteOffset);

    private static long CountElements(int[] shape)
    {
        long elements = 1;
        foreach (int dimension in shape)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(dimension);
            elements = checked(elements * dimension);
        }
        return elements;
    }

    public string Name { get; }
    public DType DType { get; }
    public int[] Shape { get; }
    public long ElementCount { get; }
    public long ByteLength { get; }
    public ulong Address { get; private set; }

    public string ShapeText => "[" + string.Join(", ", Shape) + "]";

    public void Upload<T>(ReadOnlySpan<T> values, nint stream = 0) where T : unmanaged
    {
        var bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(values);
        if (bytes.Length != ByteLength)
        {
            throw new ArgumentException($"tensor '{Name}' {ShapeText} {DType} holds {ByteLength} bytes; got {bytes.Length}");
        }
        _device.Backend.CopyHostToDevice(Address, bytes, stream);
    }

    public void Download<T>(Span<T> values, nint stream = 0) where T : unmanaged
    {
        var bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(values);
        if (bytes.Length != ByteLength)
        {
            throw new ArgumentException($"tensor '{Name}' {ShapeText} {DType} holds {ByteLength} bytes; destination {bytes.Length}");
        }
        _device.Backend.CopyDeviceToHost(bytes, Address, stream);
    }

    public T[] Download<T>(nint stream = 0) where T : unmanaged
    {
        var values = new T[ByteLength / System.Runtime.CompilerServices.Unsafe.SizeOf<T>()];
        Download<T>(values, stream);
        return values;
    }

    public void Dispose()
    {
        if (Address != 0 && _owner)
        {
            _device.Backend.Free(Address);
        }
        Address = 0;
    }
}
