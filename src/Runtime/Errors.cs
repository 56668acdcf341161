namespace KernelLM.Runtime;

/// <summary>Base of every error KernelLM raises on purpose: bad input, bad files, bad parameters.</summary>
public class KernelLMException : Exception
{
    public KernelLMException() { }
    public KernelLMException(string message) : base(message) { }
    public KernelLMException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>A safetensors file (or a shard index) is malformed, truncated or holds an unsupported tensor.</summary>
public sealed class SafeTensorsException : KernelLMException
{
    public SafeTensorsException() { }
    public SafeTensorsException(string message) : base(message) { }
    public SafeTensorsException(string message, Exception inner) : base(message, inner) { }

    public SafeTensorsException(string filePath, string? tensorName, SafeTensorsError kind, string detail)
        : base(Describe(filePath, tensorName, detail))
    {
        FilePath = filePath;
        TensorName = tensorName;
        Kind = kind;
    }

    public string? FilePath { get; }
    public string? TensorName { get; }
    public SafeTensorsError Kind { get; }

    private static string Describe(string filePath, string? tensorName, string detail) =>
        tensorName is null
            ? $"{Path.GetFileName(filePath)}: {detail} (file: {filePath})"
            : $"{Path.GetFileName(filePath)}: tensor '{tensorName}': {detail} (file: {filePath})";
}

/// <summary>What is wrong with a safetensors file; mirrors the reference implementation's error kinds.</summary>
public enum SafeTensorsError
{
    None,
    FileNotFound,
    HeaderTooSmall,
    HeaderTooLarge,
    InvalidHeaderLength,
    InvalidHeaderJson,
    InvalidTensorEntry,
    UnknownDType,
    UnsupportedDType,
    InvalidOffsets,
    InvalidShape,
    ShapeSizeMismatch,
    OverlappingTensors,
    IncompleteDataRegion,
    DuplicateTensor,
    MissingTensor,
    InvalidIndex,
}

/// <summary>config.json, tokenizer files or weights do not describe a model KernelLM can run correctly.</summary>
public sealed class ModelConfigException : KernelLMException
{
    public ModelConfigException() { }
    public ModelConfigException(string message) : base(message) { }
    public ModelConfigException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>A generation or sampling parameter is out of range; names the parameter.</summary>
public sealed class InvalidParameterException : KernelLMException
{
    public InvalidParameterException() { }
    public InvalidParameterException(string message) : base(message) { }
    public InvalidParameterException(string message, Exception inner) : base(message, inner) { }

    public InvalidParameterException(string parameter, string detail) : base($"invalid {parameter}: {detail}")
    {
        Parameter = parameter;
    }

    public string? Parameter { get; }
}

/// <summary>A prompt (plus the tokens to generate) does not fit the model's context or its sliding window.</summary>
public sealed class ContextLengthException : KernelLMException
{
    public ContextLengthException() { }
    public ContextLengthException(string message) : base(message) { }
    public ContextLengthException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>A device allocation did not fit: names the tensor, its size and what was already held.</summary>
public sealed class DeviceOutOfMemoryException : KernelLMException
{
    public DeviceOutOfMemoryException() { }
    public DeviceOutOfMemoryException(string message) : base(message) { }
    public DeviceOutOfMemoryException(string message, Exception inner) : base(message, inner) { }
}
