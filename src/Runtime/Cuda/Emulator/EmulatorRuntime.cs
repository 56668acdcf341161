using System.Collections.Concurrent;
using System.Runtime.InteropServices;

namespace KernelLM.Runtime.Cuda.Emulator;

/// <summary>
/// The native runtime (klm_runtime.cpp), loaded once per process and compiler: its worker threads live as
/// long as the process, so it is never unloaded. Mirrors the C structs of klm_runtime_api.h.
/// </summary>
internal sealed unsafe class EmulatorRuntime
{
    private static readonly ConcurrentDictionary<string, Lazy<EmulatorRuntime>> s_loaded = new(StringComparer.Ordinal);

    private readonly delegate* unmanaged<ulong, ulong*, nint> _deviceCreate;
    private readonly delegate* unmanaged<nint, void> _deviceDestroy;
    private readonly delegate* unmanaged<nint, ulong, ulong, int, void> _deviceMark;
    private readonly delegate* unmanaged<KlmLaunchDesc*, KlmFault*, int> _launch;
    private readonly delegate* unmanaged<int> _workers;

    private EmulatorRuntime(string path)
    {
        nint library = NativeLibrary.Load(path);
        Api = ((delegate* unmanaged<nint>)NativeLibrary.GetExport(library, "klm_runtime_api"))();
        _deviceCreate = (delegate* unmanaged<ulong, ulong*, nint>)NativeLibrary.GetExport(library, "klm_device_create");
        _deviceDestroy = (delegate* unmanaged<nint, void>)NativeLibrary.GetExport(library, "klm_device_destroy");
        _deviceMark = (delegate* unmanaged<nint, ulong, ulong, int, void>)NativeLibrary.GetExport(library, "klm_device_mark");
        _launch = (delegate* unmanaged<KlmLaunchDesc*, KlmFault*, int>)NativeLibrary.GetExport(library, "klm_launch");
        _workers = (delegate* unmanaged<int>)NativeLibrary.GetExport(library, "klm_runtime_workers");
    }

    /// <summary>The klm_api table handed to every module.</summary>
    public nint Api { get; }

    /// <summary>OS threads the runtime has created so far (they are kept for later launches).</summary>
    public int Workers => _workers();

    public static EmulatorRuntime Load(EmulatorCompiler compiler)
    {
        string path = compiler.CompileRuntime().Path;
        return s_loaded.GetOrAdd(path, key => new Lazy<EmulatorRuntime>(() => new EmulatorRuntime(key))).Value;
    }

    public nint CreateDevice(ulong arenaBytes, out ulong arenaBase)
    {
        ulong result;
        nint device = _deviceCreate(arenaBytes, &result);
        arenaBase = result;
        return device;
    }

    public void DestroyDevice(nint device) => _deviceDestroy(device);

    public void Mark(nint device, ulong offset, ulong bytes, bool addressable) => _deviceMark(device, offset, bytes, addressable ? 1 : 0);

    public int Launch(KlmLaunchDesc* desc, KlmFault* fault) => _launch(desc, fault);
}

/// <summary>klm_launch_desc.</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct KlmLaunchDesc
{
    public nint Device;
    public nint Thunk;
    public nint Enter;
    public fixed uint Grid[3];
    public fixed uint Block[3];
    public uint DynamicSharedBytes;
    public uint LaunchId;
    public nint Params;
    public ulong DeviceUsedBytes;
    public nint StaticShared;
    public ulong StaticSharedBytes;
    public int Parallelism;
    public int TimeoutMilliseconds;
}

/// <summary>klm_fault_kind.</summary>
internal enum KlmFaultKind
{
    None = 0,
    OutOfBounds,
    NullAddress,
    Misaligned,
    SharedOutOfBounds,
    Race,
    Barrier,
    WarpSync,
    Deadlock,
    Trap,
    Assert,
    Timeout,
    Internal,
}

/// <summary>klm_fault.</summary>
[StructLayout(LayoutKind.Sequential)]
internal unsafe struct KlmFault
{
    public KlmFaultKind Kind;
    public int IsWrite;
    public fixed uint Thread[3];
    public fixed uint Block[3];
    public ulong Address;
    public ulong Size;
    public nint ModulePath;
    public ulong CodeOffset;
    public fixed byte Message[4096];

    public readonly string MessageText
    {
        get
        {
            fixed (byte* text = Message)
            {
                return Marshal.PtrToStringUTF8((nint)text) ?? "";
            }
        }
    }

    public static string Text(nint utf8) => utf8 == 0 ? "" : Marshal.PtrToStringUTF8(utf8) ?? "";
}
