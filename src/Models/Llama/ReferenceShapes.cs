namespace KernelLM.Models.Llama;

/// <summary>
/// The configurations of real models whose shapes the GPU benchmarks and the device report run with random weights
/// (<see cref="CudaLlamaModel.Random"/>): at batch 1 the shapes decide the speed, not the values.
/// </summary>
public static class ReferenceShapes
{
    /// <summary>Llama-3.2-1B: 16 layers, hidden 2048, 32 query / 8 KV heads of 64, MLP 8192, tied 128256-token head.</summary>
    public static ModelConfig Llama32_1B { get; } = Llama(128256, 2048, 8192, 16, 32, 8, 64, tied: true);

    /// <summary>Llama-3.1-8B: 32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, untied head.</summary>
    public static ModelConfig Llama31_8B { get; } = Llama(128256, 4096, 14336, 32, 32, 8, 128, tied: false);

    /// <summary>A tiny Llama for exercising the same code on the emulated device.</summary>
    public static ModelConfig Tiny { get; } = Llama(512, 64, 128, 2, 4, 2, 16, tied: false);

    public static ModelConfig Llama(int vocabulary, int hidden, int intermediate, int layers, int heads, int kvHeads, int headDim, bool tied) => new()
    {
        Architecture = Architecture.Llama,
        ArchitectureName = "LlamaForCausalLM",
        VocabularySize = vocabulary,
        HiddenSize = hidden,
        IntermediateSize = intermediate,
        Layers = layers,
        Heads = heads,
        KvHeads = kvHeads,
        HeadDim = headDim,
        RmsNormEpsilon = 1e-5,
        RopeTheta = 500000,
        MaxPositionEmbeddings = 131072,
        TieWordEmbeddings = tied,
        QkvBias = false,
        OutputBias = false,
        SlidingWindow = 0,
        EosTokenIds = [1],
    };
}
