using System.Runtime.InteropServices;
using KernelLM.Native;
using static KernelLM.Native.CudaDriver;

namespace KernelLM.Runtime.Cuda.Driver;

// Driver objects as SafeHandles. Release never throws (a finalizer may run it); its CUresult only decides the
// SafeHandle's bool. Children (modules, streams) hold a reference on the context handle, so the primary
// context is released only after the last of them, whatever order Dispose and the GC pick.

/// <summary>A retained primary context of one device (cuDevicePrimaryCtxRetain / cuDevicePrimaryCtxRelease_v2).</summary>
internal sealed class PrimaryContextHandle : SafeHandle
{
    private PrimaryContextHandle(int device) : base(0, ownsHandle: true) => Device = device;

    public int Device { get; }

    public override bool IsInvalid => handle == 0;

    public static PrimaryContextHandle Retain(int device)
    {
        var context = new PrimaryContextHandle(device);
        Check.ThrowIfFailed(cuDevicePrimaryCtxRetain(out nint value, device));
        context.SetHandle(value);
        return context;
    }

    protected override bool ReleaseHandle() => cuDevicePrimaryCtxRelease_v2(Device) == CUresult.CUDA_SUCCESS;
}

/// <summary>A driver object that lives in a context; destroyed with that context current.</summary>
internal abstract class ContextObjectHandle : SafeHandle
{
    private PrimaryContextHandle? _context;

    protected ContextObjectHandle() : base(0, ownsHandle: true) { }

    public override bool IsInvalid => handle == 0;

    /// <summary>Takes ownership of a freshly created object of the context.</summary>
    protected void Attach(PrimaryContextHandle context, nint value)
    {
        bool added = false;
        context.DangerousAddRef(ref added);
        _context = context;
        SetHandle(value);
    }

    protected abstract CUresult Destroy(nint value);

    protected override bool ReleaseHandle()
    {
        bool released = cuCtxSetCurrent(_context!.DangerousGetHandle()) == CUresult.CUDA_SUCCESS && Destroy(handle) == CUresult.CUDA_SUCCESS;
        _context.DangerousRelease();
        return released;
    }
}

/// <summary>A loaded module (cuModuleLoadData / cuModuleUnload).</summary>
internal sealed class ModuleHandle : ContextObjectHandle
{
    public static unsafe CUresult Load(PrimaryContextHandle context, byte[] image, out ModuleHandle module)
    {
        module = new ModuleHandle();
        CUresult result;
        fixed (byte* pointer = image)
        {
            result = cuModuleLoadData(out nint value, pointer);
            if (result == CUresult.CUDA_SUCCESS)
            {
                module.Attach(context, value);
            }
        }
        return result;
    }

    protected override CUresult Destroy(nint value) => cuModuleUnload(value);
}

/// <summary>A stream (cuStreamCreate / cuStreamDestroy_v2).</summary>
internal sealed class StreamHandle : ContextObjectHandle
{
    public static StreamHandle Create(PrimaryContextHandle context, uint flags)
    {
        var stream = new StreamHandle();
        Check.ThrowIfFailed(cuStreamCreate(out nint value, flags));
        stream.Attach(context, value);
        return stream;
    }

    protected override CUresult Destroy(nint value) => cuStreamDestroy_v2(value);
}
