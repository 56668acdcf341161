using KernelLM.Runtime.Cuda.Ops;
using KernelLM.Runtime.KvSelect;

namespace KernelLM.Runtime.Cuda;

/// <summary>
/// TokenSelect on the CUDA device for a session (twin of <see cref="KvSelector"/>): one index list and selection
/// cache per layer, one scratch shared by the layers, all allocated at construction and freed by Dispose. A call per
/// layer before attention (<see cref="Select"/>) enqueues the selection kernels and returns the attention hook; nothing
/// is read back, so a decode step neither synchronises nor allocates.
/// </summary>
public sealed class CudaKvSelector : IDisposable
{
    private readonly CudaDevice _device;
    private readonly List<DeviceTensor> _owned = [];
    private readonly KvSelectLayerTensors[] _layers;
    private readonly KvSelectScratch _scratch;
    private bool _disposed;

    public CudaKvSelector(CudaDevice device, KvSelectOptions options, int batch, int layers, int heads, int headDim, int capacity)
    {
        ArgumentNullException.ThrowIfNull(device);
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        _device = device;
        Options = options;
        _layers = new KvSelectLayerTensors[layers];
        try
        {
            _scratch = KvSelectScratch.Allocate(device, batch, heads, capacity, _owned);
            for (int layer = 0; layer < layers; layer++)
            {
                _layers[layer] = CudaOps.KvSelectAllocateLayer(device, $"kv_select.{layer}", batch, heads * headDim, options, _owned);
            }
        }
        catch
        {
            FreeAll();
            throw;
        }
    }

    public KvSelectOptions Options { get; }

    /// <summary>Device bytes of the index lists, caches and scratch.</summary>
    public long ByteLength => _owned.Sum(t => t.ByteLength);

    /// <summary>The scratch (its votes are the last new selection's; tests read them).</summary>
    public KvSelectScratch Scratch => _scratch;

    public KvSelectLayerTensors Layer(int layer) => _layers[layer];

    /// <summary>
    /// Enqueues the selection of <paramref name="layer"/> for queries <paramref name="q"/> ([batch, heads, head_dim] for a
    /// decode step, [batch, tokens, heads, head_dim] for a prefill chunk) over <paramref name="contexts"/> (device [batch]
    /// I32: decode the length including the new token, prefill the chunk's start), bounded by
    /// <paramref name="maxContext"/> on the host. Returns the hook for the layer's attention, or <c>default</c> (full
    /// attention) when no sequence can be long enough to select.
    /// </summary>
    public DeviceAttentionHook Select(int layer, DeviceTensor q, DeviceTensor keyCache, DeviceTensor contexts, int maxContext, bool useCache, nint stream = 0)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!Options.Selects(maxContext))
        {
            return default;
        }
        var tensors = _layers[layer];
        CudaOps.KvSelect(_device, q, keyCache, contexts, maxContext, Options, useCache, _scratch, tensors, stream);
        return tensors.Hook;
    }

    /// <summary>Forgets every cached selection but keeps the counts (a rollback: the cached lists may name positions that
    /// are gone): zeroes each sequence's valid flag. Synchronous uploads of 4 bytes; allocates nothing.</summary>
    public void Invalidate()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        Span<byte> zero = stackalloc byte[sizeof(int)];
        zero.Clear();
        foreach (var layer in _layers)
        {
            for (int b = 0; b < layer.State.Shape[0]; b++)
            {
                // KV_SELECT_VALID is field 0 of the sequence's state.
                _device.Backend.CopyHostToDevice(layer.State.Address + (ulong)(b * CudaOps.KvSelectStateFields * sizeof(int)), zero, 0);
            }
        }
    }

    /// <summary>Forgets every cached selection and zeroes the counts (a new sequence). Synchronous uploads.</summary>
    public void Reset()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        foreach (var layer in _layers)
        {
            CudaOps.KvSelectReset(layer);
        }
    }

    /// <summary>Counts summed over layers and sequences (reads the states back: synchronises; not for the decode loop).</summary>
    public KvSelectStatistics Statistics()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        long hits = 0, selections = 0;
        foreach (var layer in _layers)
        {
            int[] state = layer.State.Download<int>();
            for (int b = 0; b < state.Length / CudaOps.KvSelectStateFields; b++)
            {
                hits += state[b * CudaOps.KvSelectStateFields + CudaOps.KvSelectHitsField];
                selections += state[b * CudaOps.KvSelectStateFields + CudaOps.KvSelectSelectionsField];
            }
        }
        return new KvSelectStatistics(selections, hits);
    }

    private void FreeAll()
    {
        foreach (var tensor in _owned)
        {
            tensor.Dispose();
        }
        _owned.Clear();
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }
        _disposed = true;
        FreeAll();
    }
}
