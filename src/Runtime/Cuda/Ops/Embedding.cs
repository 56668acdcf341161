namespace KernelLM.Runtime.Cuda.Ops;

public static partial class CudaOps
{
    /// <summary>out[t] = float(table[ids[t]]). table: [rows, cols] f32/bf16/f16; ids: [tokens] I32; out: [tokens, cols] F32.</summary>
    public static void Embedding(CudaDevice device, DeviceTensor table, DeviceTensor ids, DeviceTensor output, nint stream = 0)
    {
        const string op = "embedding";
        RequireDType(table, op, DType.F32, DType.BF16, DType.F16);
        RequireDType(ids, op, DType.I32);
        RequireDType(output, op, DType.F32);
        if (table.Shape.Length != 2)
        {
            throw new ArgumentException($"{op}: table '{table.Name}' has shape {table.ShapeText}; expected [rows, cols]");
        }
        int rows = table.Shape[0], cols = table.Shape[1];
        int tokens = checked((int)ids.ElementCount);
        RequireElements(output, (long)tokens * cols, op, $"[{tokens}, {cols}]");
        LaunchEmbedding(device, KernelName("embedding", Suffix(table.DType)), table.Address, ids.Address, output.Address, rows, cols, tokens, stream);
    }

    private static void LaunchEmbedding(CudaDevice device, string kernel, ulong table, ulong ids, ulong output, int rows, int cols, int tokens, nint stream)
    {
        if (tokens == 0)
        {
            return;
        }
        Span<byte> values = stackalloc byte[KernelArguments.ValueBytes];
        Span<nint> pointers = stackalloc nint[KernelArguments.MaxArguments];
        var arguments = new KernelArguments(values, pointers);
        arguments.Add(table);
        arguments.Add(ids);
        arguments.Add(output);
        arguments.Add(rows);
        arguments.Add(cols);
        device.Backend.Launch(device.Function(kernel), new Dim3(Blocks(cols, BlockSize), tokens), new Dim3(BlockSize), 0, stream, arguments.Pointers);
    }
}
