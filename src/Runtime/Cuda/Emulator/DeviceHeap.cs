namespace KernelLM.Runtime.Cuda.Emulator;

/// <summary>One live (or recently freed) device allocation of the emulator.</summary>
public sealed record DeviceAllocation(int Id, ulong Address, long Bytes, long BlockOffset, long BlockBytes)
{
    public override string ToString() => $"allocation #{Id} ({Bytes} bytes at 0x{Address:x})";
}

/// <summary>
/// Device memory of the emulator: a reserved arena (klm_device_create) carved into blocks of
/// [guard | user bytes rounded up to 256 | guard]. User bytes start as 0xff (NaN in f32, bf16 and f16: reads
/// of memory nothing wrote stand out); guards hold <see cref="GuardPattern"/> and are not addressable by
/// kernels (the access checks fault on them), and they are compared after every launch and on free to
/// catch writes the checks cannot see. Freed blocks wait in a quarantine before reuse, so that a kernel
/// using freed memory faults instead of reading a newer allocation. Not thread-safe: the backend locks.
/// </summary>
internal sealed unsafe class DeviceHeap
{
    public const int Alignment = 256;
    public const byte GuardPattern = 0xdb;
    public const byte UninitializedPattern = 0xff;
    private const int RecentlyFreedKept = 256;

    private readonly ulong _base;
    private readonly long _arenaBytes;
    private readonly long _budget;
    private readonly long _guard;
    private readonly long _quarantineLimit;
    private readonly Action<long, long, bool> _mark;
    private readonly List<(long Offset, long Bytes)> _free = [];   // sorted by offset, coalesced
    private readonly List<DeviceAllocation> _live = [];            // sorted by address
    private readonly Queue<DeviceAllocation> _quarantine = new();
    private readonly LinkedList<DeviceAllocation> _recentlyFreed = new();
    private long _quarantineBytes;
    private int _nextId;

    /// <param name="mark">Marks arena bytes [offset, offset + bytes) addressable (true) or not (false).</param>
    public DeviceHeap(ulong arenaBase, long arenaBytes, long budget, int guardBytes, Action<long, long, bool> mark)
    {
        _base = arenaBase;
        _arenaBytes = arenaBytes;
        _budget = budget;
        _guard = guardBytes;
        _quarantineLimit = Math.Min(budget / 4, 256L << 20);
        _mark = mark;
        _free.Add((0, arenaBytes));
    }

    public ulong ArenaBase => _base;

    /// <summary>Arena bytes ever handed out: beyond them the shadow was never written, and kernels may not go.</summary>
    public long HighWater { get; private set; }

    public bool InArena(ulong address) => address >= _base && address < _base + (ulong)_arenaBytes;

    public int LiveCount => _live.Count;

    /// <summary>Bytes charged to the budget: every live allocation rounded up to 256.</summary>
    public long LiveBytes { get; private set; }

    public IReadOnlyList<DeviceAllocation> Live => _live;

    public DeviceAllocation Allocate(long bytes)
    {
        if (bytes <= 0)
        {
            throw new CudaException($"cannot allocate {bytes} bytes of device memory (must be positive)", EmulatorErrors.InvalidValue);
        }
        long rounded = RoundUp(bytes);
        if (LiveBytes + rounded > _budget)
        {
            throw new CudaException(
                $"out of device memory: allocating {bytes} bytes with {LiveBytes} of {_budget} bytes in use " +
                $"({_live.Count} allocations; EmulatorOptions.MemoryBytes is the budget)", EmulatorErrors.OutOfMemory);
        }
        long blockBytes = rounded + 2 * _guard;
        long offset = Take(blockBytes);
        if (offset < 0)
        {
            while (_quarantine.Count > 0)
            {
                ReleaseOldestQuarantined();
            }
            offset = Take(blockBytes);
        }
        if (offset < 0)
        {
            throw new CudaException(
                $"out of device memory: no free range of {blockBytes} bytes (allocation plus guards) is left in the " +
                $"emulator's {_arenaBytes}-byte arena ({_live.Count} allocations)", EmulatorErrors.OutOfMemory);
        }
        var allocation = new DeviceAllocation(++_nextId, _base + (ulong)(offset + _guard), bytes, offset, blockBytes);
        RestoreGuards(allocation);
        System.Runtime.InteropServices.NativeMemory.Fill((void*)allocation.Address, (nuint)bytes, UninitializedPattern);
        // The shadow of arena bytes never handed out reads "addressable": mark the guards, and the user
        // bytes only where an earlier allocation may have left them poisoned or written.
        _mark(offset, _guard, false);
        _mark(offset + _guard + bytes, blockBytes - _guard - bytes, false);
        if (offset < HighWater)
        {
            _mark(offset + _guard, bytes, true);
        }
        HighWater = Math.Max(HighWater, offset + blockBytes);
        int index = _live.BinarySearch(allocation, AddressOrder.Instance);
        _live.Insert(~index, allocation);
        LiveBytes += rounded;
        return allocation;
    }

    /// <summary>Frees an allocation and returns it with any guard damage found (the caller reports it).</summary>
    public (DeviceAllocation Allocation, string? GuardDamage) Free(ulong address)
    {
        int index = FindLive(address);
        if (index < 0 || _live[index].Address != address)
        {
            throw new CudaException($"cannot free 0x{address:x}: it is not the start of a live allocation ({Describe(address)})",
                EmulatorErrors.InvalidValue);
        }
        var allocation = _live[index];
        string? damage = CheckGuards(allocation);
        _live.RemoveAt(index);
        LiveBytes -= RoundUp(allocation.Bytes);
        _mark(allocation.BlockOffset + _guard, allocation.Bytes, false);
        _quarantine.Enqueue(allocation);
        _quarantineBytes += allocation.BlockBytes;
        while (_quarantineBytes > _quarantineLimit && _quarantine.Count > 1)
        {
            ReleaseOldestQuarantined();
        }
        _recentlyFreed.AddFirst(allocation);
        if (_recentlyFreed.Count > RecentlyFreedKept)
        {
            _recentlyFreed.RemoveLast();
        }
        return (allocation, damage);
    }

    /// <summary>Frees everything (backend disposal); no checks.</summary>
    public void Clear()
    {
        _live.Clear();
        _quarantine.Clear();
        LiveBytes = 0;
    }

    /// <summary>The host pointer of [address, address + bytes), which must lie inside one live allocation.</summary>
    public byte* Resolve(ulong address, long bytes, string operation)
    {
        if (bytes < 0)
        {
            throw new CudaException($"{operation}: negative size {bytes}", EmulatorErrors.InvalidValue);
        }
        if (bytes == 0)
        {
            return (byte*)address;   // nothing is read or written
        }
        int index = FindLive(address);
        if (index < 0 || address < _live[index].Address || address >= _live[index].Address + (ulong)_live[index].Bytes)
        {
            throw new CudaException($"{operation}: device address 0x{address:x} is not in a live allocation ({Describe(address)})",
                EmulatorErrors.InvalidValue);
        }
        var allocation = _live[index];
        long offset = (long)(address - allocation.Address);
        if (offset + bytes > allocation.Bytes)
        {
            throw new CudaException(
                $"{operation}: {bytes} bytes at offset {offset} of {allocation} run {offset + bytes - allocation.Bytes} bytes past its end",
                EmulatorErrors.InvalidValue);
        }
        return (byte*)address;
    }

    /// <summary>Where a device address is, for error messages.</summary>
    public string Describe(ulong address)
    {
        int index = FindLive(address);
        if (index >= 0)
        {
            return Relative(address, _live[index], freed: false);
        }
        foreach (var allocation in _recentlyFreed)
        {
            if (InBlock(address, allocation))
            {
                return Relative(address, allocation, freed: true);
            }
        }
        return InArena(address)
            ? $"0x{address:x} is in the device arena but in no live allocation"
            : $"0x{address:x} is not a device address";
    }

    /// <summary>A description of the first damaged byte of either guard, or null.</summary>
    public string? CheckGuards(DeviceAllocation allocation)
    {
        var before = BeforeGuard(allocation);
        int damagedBefore = before.IndexOfAnyExcept(GuardPattern);
        if (damagedBefore >= 0)
        {
            return $"the guard before {allocation} changed at offset {damagedBefore - _guard} (byte 0x{before[damagedBefore]:x2})";
        }
        var after = AfterGuard(allocation);
        int damagedAfter = after.IndexOfAnyExcept(GuardPattern);
        if (damagedAfter >= 0)
        {
            return $"the guard after {allocation} changed at offset {allocation.Bytes + damagedAfter}, {damagedAfter} bytes " +
                   $"past its end (byte 0x{after[damagedAfter]:x2})";
        }
        return null;
    }

    public void RestoreGuards(DeviceAllocation allocation)
    {
        BeforeGuard(allocation).Fill(GuardPattern);
        AfterGuard(allocation).Fill(GuardPattern);
    }

    private static string Relative(ulong address, DeviceAllocation allocation, bool freed)
    {
        string what = freed ? $"{allocation}, freed earlier: use after free" : allocation.ToString();
        if (address < allocation.Address)
        {
            return $"0x{address:x} is {allocation.Address - address} bytes before the start of {what}";
        }
        ulong offset = address - allocation.Address;
        return offset < (ulong)allocation.Bytes
            ? $"0x{address:x} is offset {offset} of {what}"
            : $"0x{address:x} is offset {offset}, {offset - (ulong)allocation.Bytes} bytes past the end of {what}";
    }

    private bool InBlock(ulong address, DeviceAllocation allocation)
    {
        ulong start = _base + (ulong)allocation.BlockOffset;
        return address >= start && address < start + (ulong)allocation.BlockBytes;
    }

    /// <summary>Index of the live allocation whose block (guards included) holds the address, or -1.</summary>
    private int FindLive(ulong address)
    {
        int low = 0, high = _live.Count - 1;
        while (low <= high)
        {
            int middle = (low + high) >>> 1;
            var allocation = _live[middle];
            if (InBlock(address, allocation))
            {
                return middle;
            }
            if (address < _base + (ulong)allocation.BlockOffset)
            {
                high = middle - 1;
            }
            else
            {
                low = middle + 1;
            }
        }
        return -1;
    }

    private Span<byte> BeforeGuard(DeviceAllocation allocation) => new((byte*)(allocation.Address - (ulong)_guard), (int)_guard);

    // The slack up to the next multiple of 256 belongs to the guard after.
    private Span<byte> AfterGuard(DeviceAllocation allocation) =>
        new((byte*)(allocation.Address + (ulong)allocation.Bytes), (int)(RoundUp(allocation.Bytes) - allocation.Bytes + _guard));

    private static long RoundUp(long bytes) => (bytes + Alignment - 1) / Alignment * Alignment;

    // First fit over the sorted free list.
    private long Take(long bytes)
    {
        for (int i = 0; i < _free.Count; i++)
        {
            var (offset, size) = _free[i];
            if (size >= bytes)
            {
                if (size == bytes)
                {
                    _free.RemoveAt(i);
                }
                else
                {
                    _free[i] = (offset + bytes, size - bytes);
                }
                return offset;
            }
        }
        return -1;
    }

    private void ReleaseOldestQuarantined()
    {
        var allocation = _quarantine.Dequeue();
        _quarantineBytes -= allocation.BlockBytes;
        long offset = allocation.BlockOffset, bytes = allocation.BlockBytes;
        int index = _free.BinarySearch((offset, bytes), FreeOrder.Instance);
        index = ~index;
        if (index < _free.Count && _free[index].Offset == offset + bytes)
        {
            bytes += _free[index].Bytes;
            _free.RemoveAt(index);
        }
        if (index > 0 && _free[index - 1].Offset + _free[index - 1].Bytes == offset)
        {
            offset = _free[index - 1].Offset;
            bytes += _free[index - 1].Bytes;
            _free.RemoveAt(index - 1);
            index--;
        }
        _free.Insert(index, (offset, bytes));
    }

    private sealed class AddressOrder : IComparer<DeviceAllocation>
    {
        public static readonly AddressOrder Instance = new();
        public int Compare(DeviceAllocation? x, DeviceAllocation? y) => x!.Address.CompareTo(y!.Address);
    }

    private sealed class FreeOrder : IComparer<(long Offset, long Bytes)>
    {
        public static readonly FreeOrder Instance = new();
        public int Compare((long Offset, long Bytes) x, (long Offset, long Bytes) y) => x.Offset.CompareTo(y.Offset);
    }
}
