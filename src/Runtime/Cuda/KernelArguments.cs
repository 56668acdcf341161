using System.Runtime.CompilerServices;

namespace KernelLM.Runtime.Cuda;

/// <summary>
/// Packs kernel arguments the way cuLaunchKernel takes them (an array of pointers, each to one argument's
/// value) into caller-provided stack memory: no boxing, no allocation.
/// <code>
/// Span&lt;byte&gt; values = stackalloc byte[KernelArguments.ValueBytes];
/// Span&lt;nint&gt; pointers = stackalloc nint[KernelArguments.MaxArguments];
/// var arguments = new KernelArguments(values, pointers);
/// arguments.Add(x.Address); arguments.Add(cols); ...
/// backend.Launch(function, grid, block, 0, stream, arguments.Pointers);
/// </code>
/// </summary>
public unsafe ref struct KernelArguments
{
    public const int MaxArguments = 24;
    public const int ValueBytes = MaxArguments * 8;

    private readonly Span<byte> _values;
    private readonly Span<nint> _pointers;
    private int _offset;
    private int _count;

    public KernelArguments(Span<byte> values, Span<nint> pointers)
    {
        _values = values;
        _pointers = pointers;
    }

    public readonly ReadOnlySpan<nint> Pointers => _pointers[.._count];

    /// <summary>Appends one argument; its storage is aligned to its size (8-byte values at 8).</summary>
    public void Add<T>(T value) where T : unmanaged
    {
        int size = sizeof(T);
        _offset = (_offset + size - 1) / size * size;
        if (_offset + size > _values.Length || _count >= _pointers.Length)
        {
            throw new ArgumentException($"more kernel arguments than the {_pointers.Length} slots / {_values.Length} bytes provided");
        }
        ref byte slot = ref _values[_offset];
        Unsafe.WriteUnaligned(ref slot, value);
        _pointers[_count++] = (nint)Unsafe.AsPointer(ref slot);
        _offset += size;
    }
}
