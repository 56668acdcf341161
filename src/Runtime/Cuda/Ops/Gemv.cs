namespace KernelLM.Runtime.Cuda.Ops;

public static partial class CudaOps
{
    /// <summary>Most tokens one decode GEMV launch multiplies (KLM_GEMV_MAX_TOKENS); prefill uses GEMM.</summary>
    public const int GemvMaxTokens = 8;

    private const int GemvRowsPerWarp = 2;
    private const int GemvWarps = 4;

    /// <summary>
    /// y = x W^T (+ bias) (+ residual): weight [rows, cols], x [tokens, cols], y [tokens, rows], all one dtype
    /// (F32/BF16/F16); bias [rows] F32 or null; residual [tokens, rows] or null (may be y itself: the fused
    /// residual add). tokens &lt;= <see cref="GemvMaxTokens"/>.
    /// </summary>
    public static void Gemv(CudaDevice device, DeviceTensor weight, DeviceTensor x, DeviceTensor y, DeviceTensor? bias = null,
        DeviceTensor? residual = null, nint stream = 0)
    {
        const string op = "gemv";
        var (rows, cols, tokens) = LinearShapes(op, weight, x, y, GemvMaxTokens);
        CheckBiasAndResidual(op, rows, tokens, y, bias, residual);
        LaunchGemv(device, KernelName("gemv", Suffix(weight.DType)), [weight.Address, x.Address, bias?.Address ?? 0, residual?.Address ?? 0, y.Address],
            rows, cols, tokens, stream);
    }

    /// <summary>
    /// The same product for any number of tokens (prefill): the tiled GEMM of kernels/gemm.cu.
    /// weight [rows, cols], x [tokens, cols], y [tokens, rows]; bias [rows] F32 or null; residual or null (may be y).
    /// </summary>
    public static void Gemm(CudaDevice device, DeviceTensor weight, DeviceTensor x, DeviceTensor y, DeviceTensor? bias = null,
        DeviceTensor? residual = null, nint stream = 0)
    {
        const string op = "gemm";
        var (rows, cols, tokens) = LinearShapes(op, weight, x, y, int.MaxValue);
        CheckBiasAndResidual(op, rows, tokens, y, bias, residual);
        if (rows == 0 || tokens == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(x.Address);
        arguments.Add(weight.Address);
        arguments.Add(bias?.Address ?? 0UL);
        arguments.Add(residual?.Address ?? 0UL);
        arguments.Add(y.Address);
        arguments.Add(tokens);
        arguments.Add(rows);
        arguments.Add(cols);
        device.Backend.Launch(device.Function(KernelName("gemm", Suffix(weight.DType))), new Dim3(Blocks(rows, GemmTile), Blocks(tokens, GemmTile)),
            new Dim3(256), 0, stream, arguments.Pointers);
    }

    /// <summary>y = x W^T (+ bias) (+ residual) for any token count: the decode GEMV up to
    /// <see cref="GemvMaxTokens"/> tokens; beyond, cuBLAS where the backend has it (<see cref="CublasGemm"/>), else
    /// the built-in GEMM. What model code calls.</summary>
    public static void Linear(CudaDevice device, DeviceTensor weight, DeviceTensor x, DeviceTensor y, DeviceTensor? bias = null,
        DeviceTensor? residual = null, nint stream = 0)
    {
        long cols = weight.Shape.Length == 2 ? weight.Shape[1] : 0;
        if (cols > 0 && x.ElementCount <= GemvMaxTokens * cols)
        {
            Gemv(device, weight, x, y, bias, residual, stream);
        }
        else if (device.Backend is ICublasBackend { HasCublas: true })
        {
            CublasGemm(device, weight, x, y, bias, residual, stream);
        }
        else
        {
            Gemm(device, weight, x, y, bias, residual, stream);
        }
    }

    /// <summary>Which engine <see cref="Linear"/> uses beyond <see cref="GemvMaxTokens"/> tokens on this device.</summary>
    public static string PrefillGemmEngine(CudaDevice device) =>
        device.Backend is ICublasBackend blas ? blas.CublasDescription : "the built-in GEMM kernel (no cuBLAS on this backend)";

    /// <summary>
    /// The same product as <see cref="Gemm"/> through cuBLAS (cublasGemmEx, fp32 compute): weight [rows, cols], x
    /// [tokens, cols], y [tokens, rows]; bias [rows] F32 or null (added by add_bias after the product); residual or
    /// null: when it is y itself the product accumulates into y (beta = 1), otherwise it is copied into y first.
    /// Throws when the backend has no cuBLAS.
    /// </summary>
    public static void CublasGemm(CudaDevice device, DeviceTensor weight, DeviceTensor x, DeviceTensor y, DeviceTensor? bias = null,
        DeviceTensor? residual = null, nint stream = 0)
    {
        const string op = "cublas_gemm";
        var (rows, cols, tokens) = LinearShapes(op, weight, x, y, int.MaxValue);
        CheckBiasAndResidual(op, rows, tokens, y, bias, residual);
        if (device.Backend is not ICublasBackend { HasCublas: true } blas)
        {
            throw new CudaException($"{op}: {PrefillGemmEngine(device)}");
        }
        if (rows == 0 || tokens == 0)
        {
            return;
        }
        float beta = 0;
        if (residual is not null)
        {
            if (residual.Address != y.Address)
            {
                device.Backend.CopyDeviceToDevice(y.Address, residual.Address, y.ByteLength, stream);
            }
            beta = 1;
        }
        blas.MatmulTransposed(weight.DType, weight.Address, x.Address, y.Address, rows, cols, tokens, beta, stream);
        if (bias is not null)
        {
            AddBias(device, y, bias, stream);
        }
    }

    /// <summary>y[t, r] += bias[r]: y [tokens, rows] (F32/BF16/F16), bias [rows] F32.</summary>
    public static void AddBias(CudaDevice device, DeviceTensor y, DeviceTensor bias, nint stream = 0)
    {
        const string op = "add_bias";
        RequireDType(y, op, DType.F32, DType.BF16, DType.F16);
        RequireDType(bias, op, DType.F32);
        int rows = checked((int)bias.ElementCount);
        if (rows == 0 || y.ElementCount % rows != 0 || y.ElementCount / rows > 65535)
        {
            throw new ArgumentException($"{op}: tensor '{y.Name}' {y.ShapeText} is not [tokens <= 65535, {rows}] (rows from '{bias.Name}')");
        }
        int tokens = (int)(y.ElementCount / rows);
        if (tokens == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(y.Address);
        arguments.Add(bias.Address);
        arguments.Add(rows);
        device.Backend.Launch(device.Function(KernelName("add_bias", Suffix(y.DType))), new Dim3(Blocks(rows, 256), tokens), new Dim3(256), 0, stream,
            arguments.Pointers);
    }

    private const int GemmTile = 64;

    private static void CheckBiasAndResidual(string op, int rows, int tokens, DeviceTensor y, DeviceTensor? bias, DeviceTensor? residual)
    {
        if (bias is not null)
        {
            RequireDType(bias, op, DType.F32);
            RequireElements(bias, rows, op, $"[{rows}]");
        }
        if (residual is not null)
        {
            RequireSameDType(residual, y, op);
            RequireElements(residual, (long)tokens * rows, op, $"[{tokens}, {rows}]");
        }
    }

    /// <summary>y = silu(x G^T) * (x U^T): the MLP's gate and up projections and SwiGLU in one pass over x.
    /// gate, up [rows, cols]; x [tokens, cols]; y [tokens, rows]; one dtype.</summary>
    public static void GemvSilu(CudaDevice device, DeviceTensor gate, DeviceTensor up, DeviceTensor x, DeviceTensor y, nint stream = 0)
    {
        const string op = "gemv_silu";
        var (rows, cols, tokens) = LinearShapes(op, gate, x, y, GemvMaxTokens);
        RequireSameDType(up, gate, op);
        if (up.Shape.Length != 2 || up.Shape[0] != rows || up.Shape[1] != cols)
        {
            throw new ArgumentException($"{op}: tensor '{up.Name}' {up.ShapeText} must match '{gate.Name}' {gate.ShapeText}");
        }
        LaunchGemv(device, KernelName("gemv_silu", Suffix(gate.DType)), [gate.Address, up.Address, x.Address, y.Address], rows, cols, tokens, stream);
    }

    private static (int Rows, int Cols, int Tokens) LinearShapes(string op, DeviceTensor weight, DeviceTensor x, DeviceTensor y, int maxTokens)
    {
        RequireDType(weight, op, DType.F32, DType.BF16, DType.F16);
        RequireSameDType(x, weight, op);
        RequireSameDType(y, weight, op);
        if (weight.Shape.Length != 2)
        {
            throw new ArgumentException($"{op}: weight '{weight.Name}' {weight.ShapeText} is not [rows, cols]");
        }
        int rows = weight.Shape[0];
        int cols = weight.Shape[1];
        if (cols == 0 || x.ElementCount % cols != 0)
        {
            throw new ArgumentException($"{op}: tensor '{x.Name}' {x.ShapeText} is not [tokens, {cols}] (cols of '{weight.Name}')");
        }
        int tokens = checked((int)(x.ElementCount / cols));
        if (tokens > maxTokens)
        {
            throw new ArgumentException($"{op}: tensor '{x.Name}' holds {tokens} tokens; the decode GEMV takes at most {GemvMaxTokens} (prefill uses GEMM)");
        }
        RequireElements(y, (long)tokens * rows, op, $"[{tokens}, {rows}]");
        return (rows, cols, tokens);
    }

    private static void LaunchGemv(CudaDevice device, string kernel, ReadOnlySpan<ulong> pointerArguments, int rows, int cols, int tokens, nint stream)
    {
        if (rows == 0 || tokens == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        foreach (ulong pointer in pointerArguments)
        {
            arguments.Add(pointer);
        }
        arguments.Add(rows);
        arguments.Add(cols);
        arguments.Add(tokens);
        int rowsPerBlock = GemvWarps * GemvRowsPerWarp;
        device.Backend.Launch(device.Function(kernel), new Dim3(Blocks(rows, rowsPerBlock)), new Dim3(GemvWarps * 32), 0, stream, arguments.Pointers);
    }
}
