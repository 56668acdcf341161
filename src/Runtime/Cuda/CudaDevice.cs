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
/// synchronous copies on the given stream. A <see cref="View"/> names part of another tensor's memory and
/// owns nothing.
/// </summary>
public sealed class DeviceTensor : IDisposable
{
    private readonly CudaDevice _device;
    private readonly bool _owner;

    internal DeviceTensor(CudaDevice device, string name, DType dtype, int[] shape)
        : this(device, name, dtype, shape, address: 0)
    {
        Address = device.Backend.Allocate(Math.Max(ByteLength, 1));
        _owner = true;
    }

    private DeviceTensor(CudaDevice device, string name, DType dtype, int[] shape, ulong address)
    {
        if (!dtype.IsSupported() && dtype != DType.I32)
        {
            throw new ArgumentException($"tensor '{name}': dtype {dtype} is not a device dtype (F32, F16, BF16, I32)");
        }
        _device = device;
        Name = name;
        DType = dtype;
        Shape = shape;
        long elements = 1;
        foreach (int dimension in shape)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(dimension);
            elements = checked(elements * dimension);
        }
        ElementCount = elements;
        ByteLength = elements * dtype.SizeOf();
        Address = address;
    }

    /// <summary>
    /// A tensor over bytes [byteOffset, byteOffset + its size) of this one, without a copy: one layer of a KV
    /// cache allocated for all layers, or an output followed by a guard region. It owns nothing (Dispose is a
    /// no-op) and must not outlive this tensor. The offset is a multiple of 16 bytes, which kernels' vector
    /// loads rely on.
    /// </summary>
    public DeviceTensor View(string name, DType dtype, long byteOffset, params int[] shape)
    {
        ObjectDisposedException.ThrowIf(Address == 0, this);
        var view = new DeviceTensor(_device, name, dtype, shape, Address + (ulong)byteOffset);
        if (byteOffset < 0 || byteOffset % 16 != 0 || byteOffset + view.ByteLength > ByteLength)
        {
            throw new ArgumentException($"view '{name}' {view.ShapeText} {dtype} at byte {byteOffset} does not lie 16-byte aligned " +
                                        $"inside tensor '{Name}' {ShapeText} {DType} ({ByteLength} bytes)");
        }
        return view;
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
